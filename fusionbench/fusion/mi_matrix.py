"""Multiplicative interactions, matrix form (Jayakumar et al., ICLR 2020; MultiBench's
``MultiplicativeInteractions2Modal(input_dims, output_dim, 'matrix')``, the "MI-Matrix" row of DynMM Table 1).

One modality's embedding x (width n) generates the weights of a linear layer applied to the other's,
y (width m): a hypernetwork with a 3-way weight tensor W (n x m x d)::

    W'(x) = x W + V                  (m x d),     W in R^{n x m x d},  V in R^{m x d}
    b'(x) = x U + b                  (d),         U in R^{n x d},      b in R^d
    h     = y W'(x) + b'(x)          (d)
          = sum_{n,m} x_n y_m W_nmd + y V + x U + b

so h holds the bilinear (x-y), both linear and the constant terms. MultiBench's MM-IMDB example
(examples/multimedia/mmimdb_multi_interac_matrix.py) feeds x = text embedding (512), y = image (512),
d = 1024, then Linear(1024, 23): W alone is 512 x 512 x 1024 = 268 M parameters. ``first`` names the modality
playing x (MultiBench: its first input, the text); the default is the first in sorted order. Initialisation as
MultiBench: Xavier-normal W, U, V (torch's fans of a 3-D tensor), b ~ N(0, 1).

Computed as vec(x (x) y) @ W.reshape(n m, d): the same sum and multiply-adds as the hypernetwork form, with a
(B, n m) intermediate instead of (B, m, d).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fusionbench.errors import ConfigError
from fusionbench.fusion.base import EncoderFusion


class MIMatrixFusion(EncoderFusion):
    """Args:
    output_dim: width d of the fused vector fed to the head (MultiBench MM-IMDB: 1024).
    first: the modality x that generates the weights (MultiBench MM-IMDB: ``text``); null = first sorted.
    """

    def __init__(
        self, encoders, num_outputs: int, output_dim: int = 1024, first: str | None = None, **head
    ) -> None:
        super().__init__(encoders, num_outputs, **head)
        if len(self.modalities) != 2:
            raise ConfigError(
                f"MI-Matrix fusion combines exactly two modalities, got {self.modalities}; set "
                "`dataset.modalities` to two of them."
            )
        if first is None:
            first = self.modalities[0]
        if first not in self.modalities:
            raise ConfigError(f"fusion.first={first!r} is not one of the modalities {self.modalities}.")
        self.first = first
        self.second = next(m for m in self.modalities if m != first)
        n, m = self.embed_dims[self.first], self.embed_dims[self.second]
        self.W = nn.Parameter(nn.init.xavier_normal_(torch.empty(n, m, output_dim)))
        self.U = nn.Parameter(nn.init.xavier_normal_(torch.empty(n, output_dim)))
        self.V = nn.Parameter(nn.init.xavier_normal_(torch.empty(m, output_dim)))
        self.b = nn.Parameter(torch.randn(output_dim))
        self.fused_dim = int(output_dim)
        self.build_head()

    def fuse(self, embeddings: Mapping[str, torch.Tensor]) -> torch.Tensor:
        x, y = embeddings[self.first], embeddings[self.second]
        outer = (x.unsqueeze(2) * y.unsqueeze(1)).flatten(1)  # (B, n m), n-major like W.reshape
        return outer @ self.W.flatten(0, 1) + y @ self.V + x @ self.U + self.b
