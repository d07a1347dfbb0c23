"""Tensor fusion (Zadeh et al., EMNLP 2017, TFN): the flattened outer product of the embeddings,
each extended by a constant 1 so unimodal and lower-order terms survive:

    h = vec([z_1; 1] (x) [z_2; 1] (x) ... (x) [z_N; 1]),   dim h = prod_i (d_i + 1).
"""

from __future__ import annotations

import math

import torch

from fusionbench.errors import ConfigError
from fusionbench.fusion.base import EncoderFusion

MAX_FUSED_DIM = 2_000_000


def append_one(z: torch.Tensor) -> torch.Tensor:
    return torch.cat([z, z.new_ones(z.shape[0], 1)], dim=1)


class TensorFusion(EncoderFusion):
    def __init__(self, encoders, num_outputs: int, **head) -> None:
        super().__init__(encoders, num_outputs, **head)
        self.fused_dim = math.prod(d + 1 for d in self.embed_dims.values())
        if self.fused_dim > MAX_FUSED_DIM:
            raise ConfigError(
                f"Tensor fusion of widths {self.embed_dims} gives {self.fused_dim:,} features (limit "
                f"{MAX_FUSED_DIM:,}). Use narrower encoders or low-rank tensor fusion (fusion=lowrank)."
            )
        self.build_head()

    def fuse(self, embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
        out = append_one(embeddings[self.modalities[0]])
        for m in self.modalities[1:]:
            out = (out.unsqueeze(2) * append_one(embeddings[m]).unsqueeze(1)).flatten(1)
        return out
