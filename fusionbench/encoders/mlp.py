"""Multi-layer perceptron encoder for feature vectors (omics views, pre-extracted features)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fusionbench.encoders.context import ContextEncoder

_NORMS = {"none": None, "batch": nn.BatchNorm1d, "layer": nn.LayerNorm}


class MLPEncoder(ContextEncoder):
    """Flatten, then ``[Linear -> norm -> ReLU -> Dropout] x len(hidden_dims)``.

    Args:
        input_dim: features per sample after flattening (filled in from the dataset by `train`).
        hidden_dims: layer widths; the last one is ``output_dim``. Empty means identity.
        dropout: dropout after every layer.
        norm: ``none``, ``batch`` or ``layer`` normalisation after every linear layer.

    A context (`attach_context`) joins after the linear map of layer k, i.e. as if concatenated to
    that layer's input.
    """

    width_key = "hidden_dims"  # the argument that sets output_dim

    def __init__(
        self, input_dim: int, hidden_dims: Sequence[int] = (64,), dropout: float = 0.0, norm: str = "none"
    ) -> None:
        super().__init__()
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {sorted(_NORMS)}, got {norm!r}")
        self.input_dim = int(input_dim)
        layers: list[nn.Module] = []
        width = self.input_dim
        for h in hidden_dims:
            layers.append(nn.Linear(width, h))
            if _NORMS[norm] is not None:
                layers.append(_NORMS[norm](h))
            layers += [nn.ReLU(), nn.Dropout(dropout)]
            width = h
        self.net = nn.Sequential(*layers)
        self.output_dim = width

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.input_dim:
            raise ValueError(f"MLPEncoder expects {self.input_dim} features per sample, got {x.shape[1]}")
        k = 0
        for module in self.net:
            x = module(x)
            if isinstance(module, nn.Linear):  # a context joins after layer k's linear map
                x = self.join(k, x, context)
                k += 1
        return x

    def join_widths(self) -> list[int]:
        return [m.out_features for m in self.net if isinstance(m, nn.Linear)]
