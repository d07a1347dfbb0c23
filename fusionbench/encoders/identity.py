"""Pass-through encoder for features that are already embeddings (and for wrapped fusions)."""

from __future__ import annotations

import torch

from fusionbench.encoders.context import ContextEncoder


class IdentityEncoder(ContextEncoder):
    """Returns its input flattened to (B, input_dim); ``output_dim = input_dim``. With a context it
    returns ``x + B c``, Pro-Fusion's eq. 7 literally."""

    def __init__(self, input_dim: int) -> None:
        super().__init__()
        self.input_dim = self.output_dim = int(input_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.join(0, x.flatten(1), context)

    def join_widths(self) -> list[int]:
        return [self.input_dim]


class SequenceIdentityEncoder(ContextEncoder):
    """Returns a (B, L, d) sequence unchanged (per-token features that a fusion reads step by step, such as
    CM-BERT's word-aligned audio); ``output_dim = in_features``. With a context: ``x_t + B c`` at every step.
    """

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.in_features = self.output_dim = int(in_features)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"SequenceIdentityEncoder expects (batch, length, {self.in_features}), got {tuple(x.shape)}"
            )
        joint = self._modules.get("context_join")
        if context is None or joint is None:
            return x
        return x + joint.proj(context).unsqueeze(1).to(x.dtype)

    def join_widths(self) -> list[int]:
        return [self.in_features]
