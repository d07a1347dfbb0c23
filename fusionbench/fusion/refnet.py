"""Refiner Fusion Network (Refnet; Sankaran, Yang & Lim 2021) as MultiBench runs it on AV-MNIST
(``examples/multimedia/avmnist_refnet.py`` with ``RefNet_objective(0.1)``):

    z_m = P_m(G_m(x_m))                          (P_m: Linear(d_m, embed_dim) where d_m != embed_dim)
    h   = [z_1; ...; z_N]                        late fusion by concatenation (384 on AV-MNIST)
    y   = head(h)                                MLP(384, 100, 10)
    r   = R(h) = [r_1; ...; r_N]                 refiner MLP(384, 1000, sum_m |x_m|) = 784 + 12544
    aux = ref_weight * sum_m (1 - cos(r_m, flatten(x_m)))   CosineEmbeddingLoss, target +1, batch mean

With the AV-MNIST backbone (image LeNet -> 48, audio LeNet -> 192) and ``embed_dim=192`` this is
MultiBench's model: image ``Sequential(LeNet, Linear(48, 192))``, audio LeNet(192). Faithful: sizes,
the cosine "self-supervised" term on the flattened raw inputs, its weight 0.1. Choices:
- slices of R(h) follow the sorted modality order (audio, then image) where MultiBench uses its list
  order (image, audio); the two are a permutation of R's output units, so the model class is the same.
- ``aux_loss`` is the already weighted term (``ref_weight``). It is computed in
  `step` from the inputs the encoders saw, so Pro-Fusion's last step carries it.
- The refiner needs the raw input sizes: ``input_shapes`` (per modality) or, for vector encoders,
  their ``input_dim``. LeNet encoders do not know their input size, so AV-MNIST configs set
  ``input_shapes: {image: [1, 28, 28], audio: [1, 112, 112]}``.
- Pro-Fusion's Table 10 gives Refnet 582k parameters, far fewer than MultiBench's refiner alone
  (384*1000 + 1000*13328 ~ 13.7M); the paper's own refiner is unknown, so MultiBench's is used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fusionbench.errors import ConfigError
from fusionbench.fusion.base import EncoderFusion, FusionStep, mlp_head

AVMNIST_SHAPES_HINT = "{image: [1, 28, 28], audio: [1, 112, 112]}"


def resolve_input_shapes(
    encoders: Mapping[str, nn.Module],
    modalities: Sequence[str],
    input_shapes: Mapping[str, int | Sequence[int]] | None,
    method: str,
) -> dict[str, tuple[int, ...]]:
    """Per-sample input shape of every modality: from ``input_shapes`` or the encoder's ``input_dim``."""
    given = {
        m: (int(s),) if isinstance(s, int) else tuple(int(v) for v in s)
        for m, s in (input_shapes or {}).items()
    }
    unknown = sorted(set(given) - set(modalities))
    if unknown:
        raise ConfigError(f"fusion.input_shapes names {unknown}, but the encoders are {list(modalities)}.")
    shapes = {}
    for m in modalities:
        dim = getattr(encoders[m], "input_dim", None)
        if m in given:
            if dim is not None and math.prod(given[m]) != int(dim):
                raise ConfigError(
                    f"fusion.input_shapes.{m}={list(given[m])} has {math.prod(given[m])} values but the "
                    f"'{m}' encoder takes {dim}; fix or remove that entry."
                )
            shapes[m] = given[m]
        elif dim is not None:
            shapes[m] = (int(dim),)
        else:
            raise ConfigError(
                f"{method} reconstructs the raw inputs, so it must know their shapes, and the '{m}' encoder "
                f"({type(encoders[m]).__name__}) does not say its input size. Set fusion.input_shapes "
                f"(for AV-MNIST: {AVMNIST_SHAPES_HINT}; under Pro-Fusion: fusion.base_args.input_shapes)."
            )
    return shapes


def flat_input(x: torch.Tensor, size: int, modality: str, method: str) -> torch.Tensor:
    flat = x.reshape(x.shape[0], -1).float()
    if flat.shape[1] != size:
        raise ConfigError(
            f"{method} was built for {size} values per '{modality}' sample but the batch has {flat.shape[1]} "
            f"(shape {list(x.shape[1:])}); set fusion.input_shapes to the dataset's shapes."
        )
    return flat


class RefNetFusion(EncoderFusion):
    """Args:
    encoders: one encoder per modality.
    num_outputs: classes.
    embed_dim: width every embedding is linearly projected to before concatenation (only those
        whose width differs get a projection; MultiBench: 192). None: no projection.
    refiner_hidden: hidden width of the refiner MLP (1000).
    ref_weight: weight of the summed cosine-embedding terms (0.1).
    input_shapes: per-sample shape of each modality's input (see module docstring).
    head_hidden: hidden widths of the prediction head ([100]).
    head_dropout: dropout inside the head.
    """

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        num_outputs: int,
        embed_dim: int | None = 192,
        refiner_hidden: int = 1000,
        ref_weight: float = 0.1,
        input_shapes: Mapping[str, int | Sequence[int]] | None = None,
        head_hidden: Sequence[int] = (100,),
        head_dropout: float = 0.0,
    ) -> None:
        super().__init__(encoders, num_outputs, head_hidden=head_hidden, head_dropout=head_dropout)
        if ref_weight < 0:
            raise ConfigError(f"fusion.ref_weight must be >= 0, got {ref_weight}.")
        dims = self.embed_dims
        self.project = nn.ModuleDict(
            {
                m: nn.Linear(d, int(embed_dim))
                for m, d in dims.items()
                if embed_dim is not None and d != int(embed_dim)
            }
        )
        self.fused_dim = sum(int(embed_dim) if m in self.project else d for m, d in dims.items())
        self.input_shapes = resolve_input_shapes(self.encoders, self.modalities, input_shapes, "Refnet")
        self.input_sizes = {m: math.prod(s) for m, s in self.input_shapes.items()}
        self.ref_weight = float(ref_weight)
        self.refiner = mlp_head(self.fused_dim, sum(self.input_sizes.values()), [int(refiner_hidden)])
        self.build_head()

    def fuse(self, embeddings: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat(
            [self.project[m](embeddings[m]) if m in self.project else embeddings[m] for m in self.modalities],
            dim=-1,
        )

    def cosine_terms(
        self, fused: torch.Tensor, inputs: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """``1 - cos(r_m, flatten(x_m))`` averaged over the batch, per modality (unweighted)."""
        recon = self.refiner(fused)
        out, start = {}, 0
        ones = torch.ones(fused.shape[0], device=fused.device, dtype=fused.dtype)
        for m in self.modalities:
            size = self.input_sizes[m]
            target = flat_input(inputs[m], size, m, "Refnet").to(fused.dtype)
            out[m] = F.cosine_embedding_loss(recon[:, start : start + size], target, ones)
            start += size
        return out

    def step(
        self, inputs: Mapping[str, torch.Tensor], context: Mapping[str, torch.Tensor] | None = None
    ) -> FusionStep:
        embeddings = self.encode(inputs, context)
        fused = self.fuse(embeddings)
        terms = self.cosine_terms(fused, inputs)
        total = torch.stack(list(terms.values())).sum()
        info = {f"refnet/cos_{m}": t.detach() for m, t in terms.items()}
        return FusionStep(fused, self.ref_weight * total, info, embeddings)
