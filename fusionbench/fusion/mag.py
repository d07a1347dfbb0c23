"""MAG-BERT and MAG-XLNet (Rahman et al. 2020, "Integrating Multimodal Information in Large Pretrained
Transformers"), as the public code WasifurRahman/BERT_multimodal_transformer (``modeling.py``, ``bert.py``,
``xlnet.py``, ``multimodal_driver.py``, commit dc7876f) builds them.

The Multimodal Adaptation Gate shifts every word-piece representation Z (B, L, H) of a pretrained transformer
by a displacement computed from the word-aligned visual V (B, L, d_v) and acoustic A (B, L, d_a) features
(paper §3.1, in its order; the numbers are ours where the paper's could not be checked):

    g_v = R(W_gv [V; Z] + b_v)                                   (1)
    g_a = R(W_ga [A; Z] + b_a)                                   (2)
    H   = g_a ⊙ (W_a A) + g_v ⊙ (W_v V) + b_H                    (3)
    Z̄   = Z + α H                                                (4)
    α   = min(||Z||_2 / ||H||_2 · β, 1)                          (5)

then "layer normalisation and dropout" of Z̄ go on into the rest of the transformer. As the code:
R is ReLU; b_H is the pair of biases of W_v and W_a (``H = g_v ⊙ (W_v V + b'_v) + g_a ⊙ (W_a A + b'_a)``);
α is taken per token with ``||H|| + eps`` (eps = 1e-6) in the denominator and ``||H|| = 0`` replaced by 1
(so a zero shift gives α = min(β ||Z|| / (1 + eps), 1), not a division by zero); the output is
``Dropout(LayerNorm(Z + α H))`` (dropout after the norm, MAG's ``dropout_prob`` = 0.5); gradients flow
through α. Zero visual and acoustic input gives ``H = g_v ⊙ b'_v + g_a ⊙ b'_a``, a shift conditioned on the
text alone, which is exactly 0 at initialisation (zero biases): the output is then ``Dropout(LayerNorm(Z))``.
MAG's own LayerNorm therefore always runs, so even a zero shift is not the text-only model.

Where the shift goes (``inject_after``, a block index of `PretrainedTextEncoder.hidden_states`): BERT after
block 0, the embedding output (``MAG_BertModel``: ``MAG(self.embeddings(...))``); XLNet after block 1, the
output of its first layer (``XLNET_INJECTION_INDEX = 1``: MAG runs before ``self.layer[1]``). ``null``
picks these (1 for XLNet, 0 for every other model type).

Head, as the code: BERT's pooled output (its tanh pooler on [CLS]; the backbone sets ``pool: pooler``) ->
Dropout(hidden_dropout_prob 0.1) -> Linear(H, 1). XLNet's ``SequenceSummary`` (summary_type "last",
summary_use_proj, tanh, summary_last_dropout 0.1) -> ``logits_proj`` Linear(H, 1): the last hidden state of
the last token (XLNet's <cls>; the backbone's ``pool: cls`` takes it) -> Linear(H, H) -> tanh -> Dropout ->
Linear(H, 1). The fused vector (what Pro-Fusion feeds back) is the pooled / summarised vector before the
dropout. New layers (MAG, summary, head) are initialised as ``transformers``' ``_init_weights`` does for the
code's modules: weights N(0, initializer_range = 0.02), biases 0, LayerNorm (1, 0).

Pro-Fusion (``fusion=profusion fusion.base=mag``): the context joins the text encoder after block
``join_layer`` (0: added to the embedding output after MAG's shift for BERT, before it for XLNet) and the
audio and vision sequences at every position (`SequenceIdentityEncoder`), before MAG reads them. The encoders
return sequences, so Pro-Fusion's ``feedback=own`` is not supported; ``feedback=fused`` is.

Modalities: exactly audio, text and vision; the public MAG takes both nonverbal streams, so a subset is an
error. Their widths come from the encoders (74 / 47 on MOSI, 74 / 35 on MOSEI), never from YAML.

Departures from the code: the XLNet encoder gets no segment ids (MAG passes 0 for words, 2 for <cls>, 3 for
padding, which turns on XLNet's relative segment encoding; BERT's are all 0 there, the same as none); MAG's
scheduler counts ``int(N / 48) * 40`` steps while it runs ``ceil(N / 48) * 40`` (the rate reaches 0 early),
``linear_warmup`` counts the steps the trainer runs; MAG logs the best test accuracy over epochs, runs here
select the epoch on ``val/loss``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fusionbench.encoders.pretrained import split_tokens
from fusionbench.errors import ConfigError
from fusionbench.fusion.base import EncoderFusion, FusionStep

MODALITIES = ("audio", "text", "vision")


def init_like_transformers(module: nn.Module, std: float) -> None:
    """``PreTrainedModel._init_weights`` of BERT / XLNet for the layers the MAG code adds."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MAG(nn.Module):
    """The Multimodal Adaptation Gate (eqs. 1-5 of the module docstring). Parameter names follow the code
    (``W_hv``, ``W_ha``: the gates over [modality; text]; ``W_v``, ``W_a``: the projections; ``LayerNorm``).

    Args:
        hidden: the transformer width H. audio_dim, vision_dim: widths of A and V.
        beta_shift: β, the bound on the shift's norm relative to ||Z||.
        dropout: applied after the LayerNorm (MAG's ``dropout_prob``).
        eps: added to ||H|| in α's denominator.
    """

    def __init__(
        self,
        hidden: int,
        audio_dim: int,
        vision_dim: int,
        beta_shift: float = 1.0,
        dropout: float = 0.5,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.W_hv = nn.Linear(vision_dim + hidden, hidden)
        self.W_ha = nn.Linear(audio_dim + hidden, hidden)
        self.W_v = nn.Linear(vision_dim, hidden)
        self.W_a = nn.Linear(audio_dim, hidden)
        self.LayerNorm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)
        self.beta_shift = float(beta_shift)
        self.eps = float(eps)

    def forward(
        self, z: torch.Tensor, vision: torch.Tensor, audio: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Dropout(LayerNorm(Z + α H)) (B, L, H), α (B, L), the applied shift α H (B, L, H))."""
        vision, audio = vision.to(z.dtype), audio.to(z.dtype)
        g_v = F.relu(self.W_hv(torch.cat((vision, z), dim=-1)))  # (1)
        g_a = F.relu(self.W_ha(torch.cat((audio, z), dim=-1)))  # (2)
        h_m = g_v * self.W_v(vision) + g_a * self.W_a(audio)  # (3)
        z_norm = z.norm(p=2, dim=-1)
        h_norm = h_m.norm(p=2, dim=-1)
        h_norm = torch.where(h_norm == 0, torch.ones_like(h_norm), h_norm)  # the code's guard
        alpha = torch.clamp(z_norm / (h_norm + self.eps) * self.beta_shift, max=1.0)  # (5)
        shift = alpha.unsqueeze(-1) * h_m
        return self.dropout(self.LayerNorm(z + shift)), alpha, shift  # (4), then norm and dropout


class MAGFusion(EncoderFusion):
    """MAG-BERT / MAG-XLNet on the encoders ``text`` (`PretrainedTextEncoder`) and ``audio``, ``vision``
    (word-aligned (B, L, d) sequences, e.g. `SequenceIdentityEncoder`). See the module docstring.

    Args:
        inject_after: block after which MAG shifts the hidden states (0 = embedding output); None: 1 for
            XLNet, 0 otherwise (the public code's choices).
        beta_shift, dropout, eps: MAG's β, dropout and epsilon.
        summary: XLNet's sequence-summary projection (Linear(H, H) + tanh) before the head; None: XLNet only.
        head_dropout: dropout before the output layer; None: the text model's (BERT hidden_dropout_prob,
            XLNet summary_last_dropout; 0.1 for both).
    """

    def __init__(
        self,
        encoders,
        num_outputs: int,
        inject_after: int | None = None,
        beta_shift: float = 1.0,
        dropout: float = 0.5,
        eps: float = 1e-6,
        summary: bool | None = None,
        head_dropout: float | None = None,
    ) -> None:
        super().__init__(encoders, num_outputs)
        if tuple(self.modalities) != MODALITIES:
            raise ConfigError(
                f"MAG fuses exactly the modalities {list(MODALITIES)} (the public code always takes both "
                f"visual and acoustic features); the backbone built encoders for {self.modalities}. Use "
                "dataset=mosi_mag or mosei_mag with its backbone (dataset.modalities=[audio, text, vision])."
            )
        text = self.encoders["text"]
        if not hasattr(text, "hidden_states") or not hasattr(text, "model_type"):
            raise ConfigError(
                f"MAG shifts the hidden states of a pretrained transformer: backbone.text must be a "
                f"fusionbench.encoders.PretrainedTextEncoder, got {type(text).__name__}."
            )
        self.model_type = str(text.model_type)
        self.hidden = int(text.hidden)
        if inject_after is None:
            inject_after = 1 if self.model_type == "xlnet" else 0
        if not 0 <= int(inject_after) <= text.num_layers:
            raise ConfigError(
                f"fusion.inject_after={inject_after}: the text model has blocks 0 (embedding output) to "
                f"{text.num_layers}."
            )
        self.inject_after = int(inject_after)
        std = float(getattr(text.model.config, "initializer_range", 0.02))
        dims = self.embed_dims
        self.mag = MAG(self.hidden, dims["audio"], dims["vision"], beta_shift, dropout, eps)
        if summary is None:
            summary = self.model_type == "xlnet"
        self.summary = nn.Linear(self.hidden, self.hidden) if summary else None
        if head_dropout is None:
            config = text.model.config
            key = "summary_last_dropout" if self.model_type == "xlnet" else "hidden_dropout_prob"
            head_dropout = float(getattr(config, key, 0.1) or 0.0)
        self.fused_dim = self.hidden
        self.head = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(self.hidden, self.num_outputs))
        for module in (self.mag, self.summary, self.head):
            if module is not None:
                init_like_transformers(module, std)

    def _encode(
        self, inputs: Mapping[str, torch.Tensor], context: Mapping[str, torch.Tensor] | None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(encoder outputs, MAG statistics): audio and vision first, then the text model with the shift."""
        self.check_inputs(inputs)
        context = context or {}
        out = {m: self.encoders[m](inputs[m], context.get(m)) for m in ("audio", "vision")}
        mask = split_tokens(inputs["text"])[1]
        for m in ("audio", "vision"):
            if out[m].shape[:2] != mask.shape:
                raise ConfigError(
                    f"MAG needs {m} aligned with the word pieces, (batch, {mask.shape[1]}, d); got "
                    f"{tuple(out[m].shape)}. Use dataset=mosi_mag / mosei_mag (word-aligned features)."
                )
        seen: dict[str, torch.Tensor] = {}

        def shift(h: torch.Tensor) -> torch.Tensor:
            fused, alpha, applied = self.mag(h, out["vision"], out["audio"])
            seen.update(alpha=alpha, ratio=applied.norm(dim=-1) / h.norm(dim=-1).clamp_min(self.mag.eps))
            return fused

        out["text"] = self.encoders["text"].hidden_states(
            inputs["text"], edits={self.inject_after: shift}, context=context.get("text")
        )
        w = mask.to(out["text"].dtype)
        real = w.sum().clamp_min(1.0)
        info = {f"mag/{k}": ((v.detach() * w).sum() / real) for k, v in seen.items()}  # over real tokens
        return {m: out[m] for m in self.modalities}, info

    def encode(
        self, inputs: Mapping[str, torch.Tensor], context: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Encoder outputs: the text model's last hidden states (B, L, H) after MAG, audio and vision."""
        return self._encode(inputs, context)[0]

    def pool(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The fused vector: the text encoder's pooling (BERT's pooler / XLNet's last token), then XLNet's
        summary projection and tanh."""
        pooled = self.encoders["text"].pooled(h, mask)
        return torch.tanh(self.summary(pooled)) if self.summary is not None else pooled

    def step(
        self, inputs: Mapping[str, torch.Tensor], context: Mapping[str, torch.Tensor] | None = None
    ) -> FusionStep:
        embeddings, info = self._encode(inputs, context)
        fused = self.pool(embeddings["text"], split_tokens(inputs["text"])[1])
        return FusionStep(fused, None, info, embeddings)
