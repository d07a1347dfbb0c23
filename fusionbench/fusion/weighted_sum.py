"""Weighted-sum fusion, the baseline of DEQ fusion Table 5 and its injection (eq. 12):

    x_fuse = sum_i w_i x_i,

with one learnable scalar w_i per modality (initialised to 1, as in the public DEQ code).
"""

from __future__ import annotations

import torch
from torch import nn

from fusionbench.fusion.base import EncoderFusion, require_equal_dims


class WeightedSumFusion(EncoderFusion):
    """Args:
    bias: add a learnable scalar b (the generic public DEQ module has one, eq. 12 does not).
    """

    def __init__(self, encoders, num_outputs: int, bias: bool = False, **head) -> None:
        super().__init__(encoders, num_outputs, **head)
        self.fused_dim = require_equal_dims(self.embed_dims, "Weighted-sum fusion", self.encoders)
        self.weights = nn.Parameter(torch.ones(len(self.modalities)))
        self.bias = nn.Parameter(torch.zeros(())) if bias else None
        self.build_head()

    def fuse(self, embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
        z = torch.stack([embeddings[m] for m in self.modalities], dim=-1)  # (B, d, N)
        fused = z @ self.weights
        return fused + self.bias if self.bias is not None else fused
