"""Late fusion: concatenate the unimodal embeddings, then a head (MultiBench ``Concat``)."""

from __future__ import annotations

import torch

from fusionbench.fusion.base import EncoderFusion


class ConcatFusion(EncoderFusion):
    """``h = [z_1; ...; z_N]`` in sorted modality order, then the head."""

    def __init__(self, encoders, num_outputs: int, **head) -> None:
        super().__init__(encoders, num_outputs, **head)
        self.fused_dim = sum(self.embed_dims.values())
        self.build_head()

    def fuse(self, embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([embeddings[m] for m in self.modalities], dim=-1)
