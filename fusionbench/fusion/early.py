"""Early fusion: concatenate the raw inputs, then one joint MLP and the head.

The backbone's per-modality encoders are read only for their ``input_dim`` and then dropped, so
the model (and its parameter count) is exactly the joint network.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fusionbench.encoders.mlp import MLPEncoder
from fusionbench.errors import ConfigError
from fusionbench.fusion.base import EncoderFusion


class EarlyFusion(EncoderFusion):
    """Args:
    hidden_dims, dropout, norm: the joint `MLPEncoder` on ``[x_1; ...; x_N]``.
    """

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        num_outputs: int,
        hidden_dims: Sequence[int] = (128, 32),
        dropout: float = 0.0,
        norm: str = "none",
        **head,
    ) -> None:
        missing = [m for m, e in encoders.items() if not hasattr(e, "input_dim")]
        if missing:
            raise ConfigError(f"Early fusion needs encoders that report `input_dim`; {missing} do not.")
        self.input_modalities = sorted(encoders)
        joint = MLPEncoder(
            sum(int(encoders[m].input_dim) for m in self.input_modalities), hidden_dims, dropout, norm
        )
        super().__init__(nn.ModuleDict({"joint": joint}), num_outputs, **head)
        self.fused_dim = joint.output_dim
        self.build_head()

    def encode(
        self, inputs: Mapping[str, torch.Tensor], context: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        missing = [m for m in self.input_modalities if m not in inputs]
        if missing:
            raise ConfigError(
                f"The batch has modalities {sorted(inputs)}; early fusion needs {self.input_modalities}."
            )
        x = torch.cat([inputs[m].flatten(1) for m in self.input_modalities], dim=1)
        return {"joint": self.encoders["joint"](x, (context or {}).get("joint"))}

    def fuse(self, embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
        return embeddings["joint"]
