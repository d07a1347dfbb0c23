"""The fusion-model contract and the base the baseline fusions share.

A fusion model is built from ``encoders`` (an `nn.ModuleDict`, one encoder per modality) and
``num_outputs``; ``forward(inputs)`` returns `FusionOutput`. Models that wrappers such as Pro-Fusion
can iterate also split forward into ``step(inputs, context) -> FusionStep`` (encoders, given an
optional per-encoder context, then the fusion) and ``predict(step) -> FusionOutput`` (the head), and
report ``fused_dim``; `EncoderFusion` provides all three. A model whose loss needs the labels
(MM-Dynamics' confidence terms) also defines ``target_loss(output, target)``; the task adds it. Baselines
subclass `EncoderFusion` and implement only ``fuse(embeddings)`` and ``fused_dim``; the prediction head is
built from ``fused_dim``, so no dimension is ever written in YAML.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn

from fusionbench.encoders.stacked import encode_all
from fusionbench.errors import ConfigError


class FusionOutput(NamedTuple):
    logits: torch.Tensor
    aux_loss: torch.Tensor | None  # added to the task loss (Jacobian or resource penalties)
    info: dict[str, torch.Tensor | float]  # scalars to log (solver steps, gate usage, ...)
    extras: dict | None = None  # tensors a model's own `target_loss(output, target)` needs


class FusionStep(NamedTuple):
    """One pass of encoders and fusion layer, before the prediction head."""

    fused: torch.Tensor  # (B, fused_dim)
    aux_loss: torch.Tensor | None
    info: dict[str, torch.Tensor | float]
    embeddings: dict[str, torch.Tensor]  # encoder outputs, keyed like `encoders`
    extras: dict | None = None


def mlp_head(
    in_dim: int, num_outputs: int, hidden: Sequence[int] = (), dropout: float = 0.0
) -> nn.Sequential:
    """``[Linear -> ReLU -> Dropout]* -> Linear(num_outputs)``."""
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(in_dim, h), nn.ReLU(), nn.Dropout(dropout)]
        in_dim = h
    layers.append(nn.Linear(in_dim, num_outputs))
    return nn.Sequential(*layers)


def as_module_dict(encoders: Mapping[str, nn.Module]) -> nn.ModuleDict:
    if not encoders:
        raise ConfigError("A fusion model needs at least one encoder; the backbone config built none.")
    for m, enc in encoders.items():
        if not hasattr(enc, "output_dim"):
            raise ConfigError(f"Encoder for '{m}' ({type(enc).__name__}) has no `output_dim` attribute.")
    return encoders if isinstance(encoders, nn.ModuleDict) else nn.ModuleDict(dict(encoders))


class EncoderFusion(nn.Module):
    """``head(fuse({m: encoder_m(x_m)}))``. Modalities are processed in sorted order.

    Args:
        encoders: one encoder per modality, each with ``output_dim``.
        num_outputs: classes / labels / regression targets.
        head_hidden: hidden widths of the MLP head after fusion (empty: one linear layer).
        head_dropout: dropout inside the head.
    """

    fused_dim: int

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        num_outputs: int,
        head_hidden: Sequence[int] = (),
        head_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.encoders = as_module_dict(encoders)
        self.modalities = sorted(self.encoders.keys())
        self.num_outputs = int(num_outputs)
        self._head_args = (list(head_hidden), head_dropout)

    @property
    def embed_dims(self) -> dict[str, int]:
        return {m: int(self.encoders[m].output_dim) for m in self.modalities}

    def build_head(self) -> None:
        """Subclasses call this once ``fused_dim`` is known."""
        self.head = mlp_head(self.fused_dim, self.num_outputs, *self._head_args)

    def check_inputs(self, inputs: Mapping[str, torch.Tensor]) -> None:
        missing = [m for m in self.modalities if m not in inputs]
        if missing:
            raise ConfigError(
                f"The batch has modalities {sorted(inputs)} but the model needs {self.modalities} "
                f"(missing {missing}). Make `dataset.modalities` and the backbone agree."
            )

    def encode(
        self, inputs: Mapping[str, torch.Tensor], context: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Encoder outputs; ``context`` (keyed like `encoders`) is passed to the encoders. Encoders of one
        shape that allow it run as one batched computation (`fusionbench.encoders.stacked`)."""
        self.check_inputs(inputs)
        return encode_all(self.encoders, self.modalities, inputs, context or {})

    def fuse(self, embeddings: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The fused vector (B, fused_dim); baselines implement only this."""
        raise NotImplementedError

    def combine(
        self, embeddings: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """(fused vector, aux_loss, info); methods with penalties or statistics (DEQ) override this."""
        return self.fuse(embeddings), None, {}

    def step(
        self, inputs: Mapping[str, torch.Tensor], context: Mapping[str, torch.Tensor] | None = None
    ) -> FusionStep:
        embeddings = self.encode(inputs, context)
        fused, aux_loss, info = self.combine(embeddings)
        return FusionStep(fused, aux_loss, info, embeddings)

    def predict(self, step: FusionStep) -> FusionOutput:
        return FusionOutput(self.head(step.fused), step.aux_loss, step.info, step.extras)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> FusionOutput:
        return self.predict(self.step(inputs))


def require_equal_dims(
    dims: Mapping[str, int], method: str, encoders: Mapping[str, nn.Module] | None = None
) -> int:
    """The common output width of the encoders; else an error naming, per modality, the backbone key that
    sets its width (``width_key`` of its encoder class: ``hidden_dims`` of an MLP, ``dim`` of a
    Transformer)."""
    if len(set(dims.values())) != 1:
        keys = []
        for m, d in dims.items():
            encoder = encoders[m] if encoders is not None and m in encoders else None
            key = getattr(encoder, "width_key", None)
            keys.append(f"`backbone.{m}.{key}`={d}" if key else f"{m}={d} (its input width)")
        raise ConfigError(
            f"{method} needs every encoder to output the same width, got {', '.join(keys)}. Make them equal "
            "(a list such as `hidden_dims` ends in the width), or use a fusion that concatenates "
            "(fusion=concat)."
        )
    return next(iter(dims.values()))
