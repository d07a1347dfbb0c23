"""Pass-through encoder for features that are already embeddings (and for wrapped fusions)."""
from __future__ import annotations

import torch
from torch import nn


class IdentityEncoder(nn.Module):
    """Returns its input flattened to (B, input_dim); ``output_dim = input_dim``."""

    def __init__(self, input_dim: int) -> None:
        super().__init__()
        self.input_dim = self.output_dim = int(input_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return x.flatten(1)
