"""Unimodal baseline: one modality's encoder and a head; the other modalities are not used."""

from __future__ import annotations

import torch
from torch import nn

from fusionbench.errors import ConfigError
from fusionbench.fusion.base import EncoderFusion


class UnimodalModel(EncoderFusion):
    """Args:
    modality: which encoder to use; may be omitted when exactly one encoder is given
        (``dataset.modalities=[mrna]`` loads only that view).
    """

    def __init__(self, encoders, num_outputs: int, modality: str | None = None, **head) -> None:
        available = sorted(encoders)
        if modality is None:
            if len(available) != 1:
                raise ConfigError(
                    f"Unimodal model got encoders {available}; set `fusion.modality` to one of them, or load "
                    "a single view with `dataset.modalities=[<name>]`."
                )
            modality = available[0]
        if modality not in available:
            raise ConfigError(f"fusion.modality={modality!r} is not among the encoders {available}.")
        # keep only the used encoder so the parameter count is honest
        super().__init__(nn.ModuleDict({modality: encoders[modality]}), num_outputs, **head)
        self.modality = modality
        self.fused_dim = self.embed_dims[modality]
        self.build_head()

    def fuse(self, embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
        return embeddings[self.modality]
