"""Multimodal Bottleneck Transformer (MBT; Nagrani et al. 2021, "Attention Bottlenecks for Multimodal
Fusion"), tiny and from scratch for AV-MNIST (no public Pro-Fusion or MultiBench configuration exists).

Per modality m a pre-norm transformer over [CLS_m; tokens_m]. Layers l < L_f run separately (eq. 6 of
MBT); from the fusion layer L_f on, B shared bottleneck tokens z (learned, initialised at L_f) join
every modality's sequence and are averaged after each layer (MBT eqs. 8-9):

    [x_m^{l+1} ; ẑ_m^{l+1}] = Transformer_m^l([x_m^l ; z^l]),    z^{l+1} = mean_m ẑ_m^{l+1}

so modalities exchange information only through the bottleneck. Output: the final (layer-normed) CLS
tokens are averaged and fed to the head; with a linear head (default) this equals MBT's "same linear
classifier on every CLS, logits averaged". Each modality has its own transformer weights (MBT's
default); no weight sharing.

AV-MNIST settings (the brief's, a documented guess): image 28x28 in 7x7 patches (16 tokens), audio
112x112 in 16x16 patches (49 tokens), width 64, 4 heads, MLP 256, 4 layers, fusion from layer 2,
4 bottleneck tokens. The tokens come from the encoders: `fusionbench.encoders.patch.PatchEncoder`
(configs/backbone/avmnist_mbt.yaml), where Pro-Fusion's context is added to every patch embedding.
Any other encoder works too: a (B, d) output becomes one token, and token widths other than ``dim``
get a linear projection. The step's ``embeddings`` are the final CLS tokens (width ``dim``), MBT's
unimodal representations; Pro-Fusion's ``feedback=own`` therefore needs encoders with
``output_dim == dim`` (true for PatchEncoder).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fusionbench.errors import ConfigError
from fusionbench.fusion.base import EncoderFusion, FusionStep


class MBTFusion(EncoderFusion):
    """Args:
    encoders: one token (or vector) encoder per modality.
    num_outputs: classes.
    dim: transformer width (64).
    depth: transformer layers per modality (4).
    fusion_layer: first layer with bottleneck tokens, 0..depth (2; depth = no fusion before the CLS average).
    num_bottlenecks: shared bottleneck tokens (4).
    heads: attention heads (4).
    mlp_dim: hidden width of each transformer MLP (256).
    dropout: dropout inside the transformer layers.
    head_hidden: hidden widths of the head on the averaged CLS token (none: linear).
    head_dropout: dropout inside the head.
    """

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        num_outputs: int,
        dim: int = 64,
        depth: int = 4,
        fusion_layer: int = 2,
        num_bottlenecks: int = 4,
        heads: int = 4,
        mlp_dim: int = 256,
        dropout: float = 0.0,
        head_hidden: Sequence[int] = (),
        head_dropout: float = 0.0,
    ) -> None:
        super().__init__(encoders, num_outputs, head_hidden=head_hidden, head_dropout=head_dropout)
        if not 0 <= fusion_layer <= depth:
            raise ConfigError(f"fusion.fusion_layer must be in 0..depth ({depth}), got {fusion_layer}.")
        if dim % heads:
            raise ConfigError(f"fusion.dim ({dim}) must be divisible by fusion.heads ({heads}).")
        if num_bottlenecks < 1 and fusion_layer < depth:
            raise ConfigError(
                "fusion.num_bottlenecks must be >= 1 when any layer fuses (fusion_layer < depth)."
            )
        self.dim, self.depth, self.fusion_layer, self.num_bottlenecks = (
            int(dim),
            int(depth),
            int(fusion_layer),
            int(num_bottlenecks),
        )
        self.input_proj = nn.ModuleDict(
            {m: nn.Linear(d, dim) for m, d in self.embed_dims.items() if d != dim}
        )
        self.cls = nn.ParameterDict(
            {
                m: nn.Parameter(nn.init.trunc_normal_(torch.empty(1, 1, dim), std=0.02))
                for m in self.modalities
            }
        )
        self.bottleneck = nn.Parameter(
            nn.init.trunc_normal_(torch.empty(1, max(num_bottlenecks, 1), dim), std=0.02)
        )
        self.layers = nn.ModuleDict(
            {
                m: nn.ModuleList(
                    [
                        nn.TransformerEncoderLayer(
                            dim, heads, mlp_dim, dropout, activation="gelu", batch_first=True, norm_first=True
                        )
                        for _ in range(depth)
                    ]
                )
                for m in self.modalities
            }
        )
        self.norms = nn.ModuleDict({m: nn.LayerNorm(dim) for m in self.modalities})
        self.fused_dim = int(dim)
        self.build_head()

    def tokens(self, embeddings: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """[CLS_m; tokens_m] (B, 1 + N_m, dim) from every encoder output."""
        out = {}
        for m in self.modalities:
            t = embeddings[m]
            if t.dim() == 2:
                t = t.unsqueeze(1)
            if m in self.input_proj:
                t = self.input_proj[m](t)
            out[m] = torch.cat([self.cls[m].expand(t.shape[0], -1, -1), t], dim=1)
        return out

    def transform(self, tokens: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Final layer-normed CLS token of every modality (B, dim)."""
        x = dict(tokens)
        z = None
        for layer in range(self.depth):
            if layer < self.fusion_layer:
                x = {m: self.layers[m][layer](x[m]) for m in self.modalities}
                continue
            if z is None:
                z = self.bottleneck.expand(next(iter(x.values())).shape[0], -1, -1)
            shared = []
            for m in self.modalities:
                y = self.layers[m][layer](torch.cat([x[m], z], dim=1))
                x[m], zm = y[:, : -self.num_bottlenecks], y[:, -self.num_bottlenecks :]
                shared.append(zm)
            z = torch.stack(shared).mean(0)
        return {m: self.norms[m](x[m][:, 0]) for m in self.modalities}

    def step(
        self, inputs: Mapping[str, torch.Tensor], context: Mapping[str, torch.Tensor] | None = None
    ) -> FusionStep:
        cls = self.transform(self.tokens(self.encode(inputs, context)))
        fused = torch.stack([cls[m] for m in self.modalities]).mean(0)
        return FusionStep(fused, None, {}, cls)
