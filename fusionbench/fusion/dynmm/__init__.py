"""Dynamic multimodal fusion: the modality-level model (`model`), the fusion-level ESANet one
(`fusion_level`), its gates, decisions and resource loss (`gates`,
`routing`), stage-I loading (`stage1`), the training-schedule callback (`callback`) and inference timing
(`timing`)."""

from fusionbench.fusion.dynmm.fusion_level import FusionLevelDynMM, GlobalGate
from fusionbench.fusion.dynmm.gates import GATES, ConvGate, MLPGate, TransformerGate
from fusionbench.fusion.dynmm.model import DynMMFusion
from fusionbench.fusion.dynmm.routing import (
    anneal_temperature,
    gumbel_softmax_st,
    resource_loss,
    softmax_st,
    straight_through,
    take,
)

__all__ = [
    "GATES",
    "ConvGate",
    "DynMMFusion",
    "FusionLevelDynMM",
    "GlobalGate",
    "MLPGate",
    "TransformerGate",
    "anneal_temperature",
    "gumbel_softmax_st",
    "resource_loss",
    "softmax_st",
    "straight_through",
    "take",
]
