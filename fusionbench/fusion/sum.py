"""Sum fusion: ``h = sum_i z_i`` over equal-width unimodal embeddings."""

from __future__ import annotations

import torch

from fusionbench.fusion.base import EncoderFusion, require_equal_dims


class SumFusion(EncoderFusion):
    def __init__(self, encoders, num_outputs: int, **head) -> None:
        super().__init__(encoders, num_outputs, **head)
        self.fused_dim = require_equal_dims(self.embed_dims, "Sum fusion", self.encoders)
        self.build_head()

    def fuse(self, embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([embeddings[m] for m in self.modalities]).sum(0)
