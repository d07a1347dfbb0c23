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
