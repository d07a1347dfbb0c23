"""Context joins: how an encoder takes feedback from a fusion (Pro-Fusion's backward connections).

Pro-Fusion feeds a vector c (the back-projected fused representation) into encoder i, either with
the input (eq. 7) or at an intermediate layer (its Figure 9a). Concatenating c to the input of a
linear layer gives ``A h + B c``, so a join is implemented as an additive, bias-free projection of c
onto that layer's pre-activation output; for a convolution it acts as c appended as constant input
channels (exactly so away from the zero-padded border). A zero context therefore leaves the encoder
unchanged, which is what makes ``W = 0`` reproduce the base model.

Encoders opt in by subclassing `ContextEncoder`, listing their joinable widths in `join_widths()` and
calling ``self.join(layer_index, h, context)`` after each joinable layer.
"""

from __future__ import annotations

import torch
from torch import nn

from fusionbench.errors import ConfigError


class ContextJoin(nn.Module):
    """``h + B c`` with ``B`` broadcast over any spatial/temporal axes of ``h`` (channels on axis 1)."""

    def __init__(self, context_dim: int, width: int, layer: int) -> None:
        super().__init__()
        self.layer = int(layer)
        self.proj = nn.Linear(int(context_dim), int(width), bias=False)

    def forward(self, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        add = self.proj(context)
        return h + add.view(*add.shape, *([1] * (h.dim() - 2)))


class ContextEncoder(nn.Module):
    """Mixin for encoders that can receive a context vector at one of their layers.

    ``width_key`` names the constructor argument that sets ``output_dim`` (so that an error about widths can
    say which ``backbone.<modality>.<key>`` to change); None where the width is the input's."""

    width_key: str | None = None

    def join_widths(self) -> list[int]:
        """Channel width of the pre-activation output of each joinable layer (index 0 = first layer)."""
        raise NotImplementedError

    def attach_context(self, context_dim: int, layer: int = 0) -> None:
        """Let ``forward(x, context)`` add a projection of ``context`` (B, context_dim) at ``layer``."""
        widths = self.join_widths()
        if not widths:
            raise ConfigError(f"{type(self).__name__} has no layer a context can join (it has no layers).")
        if not 0 <= layer < len(widths):
            raise ConfigError(
                f"{type(self).__name__} has {len(widths)} layers a context can join (0..{len(widths) - 1}); "
                f"got join layer {layer}. Set `fusion.join_layer` within that range."
            )
        self.context_join = ContextJoin(context_dim, widths[layer], layer)

    def join(self, layer: int, h: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        joint = self._modules.get("context_join")  # set by attach_context (a class default would shadow it)
        if context is None or joint is None or joint.layer != layer:
            return h
        return joint(h, context)
