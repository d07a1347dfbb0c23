"""Fusion methods, one file each; a method with training-time behaviour (callbacks, diagnostics, timing) is
one package (`deq`, `dynmm`, `gradient_blend`, `profusion`). Contract: built from ``encoders`` and
``num_outputs``; ``forward(inputs) -> FusionOutput(logits, aux_loss, info)``; iterable models also provide
``step``/``predict`` (see base.py), which the Pro-Fusion wrapper uses."""

from fusionbench.fusion.base import EncoderFusion, FusionOutput, FusionStep
from fusionbench.fusion.cmbert import CMBERTFusion
from fusionbench.fusion.cmbert_deq import CMBERTDEQFusion
from fusionbench.fusion.concat import ConcatFusion
from fusionbench.fusion.constant import ConstantFusion
from fusionbench.fusion.deq import DEQFusion
from fusionbench.fusion.dynmm import DynMMFusion, FusionLevelDynMM
from fusionbench.fusion.early import EarlyFusion
from fusionbench.fusion.early_sequence import EarlySequenceFusion
from fusionbench.fusion.esanet import ESANetFusion
from fusionbench.fusion.gradient_blend import GradientBlendFusion
from fusionbench.fusion.lowrank import LowRankTensorFusion
from fusionbench.fusion.mag import MAGFusion
from fusionbench.fusion.mbt import MBTFusion
from fusionbench.fusion.mcan import MCANFusion
from fusionbench.fusion.mfas import MFASFusion
from fusionbench.fusion.mfm import MFMFusion
from fusionbench.fusion.mi_matrix import MIMatrixFusion
from fusionbench.fusion.mmdynamics import MMDynamics
from fusionbench.fusion.mmim import MMIMFusion
from fusionbench.fusion.mult import MulTFusion
from fusionbench.fusion.mutan import MutanFusion
from fusionbench.fusion.profusion import ProFusion
from fusionbench.fusion.refnet import RefNetFusion
from fusionbench.fusion.sum import SumFusion
from fusionbench.fusion.tensor import TensorFusion
from fusionbench.fusion.unimodal import UnimodalModel
from fusionbench.fusion.weighted_sum import WeightedSumFusion

__all__ = [
    "CMBERTDEQFusion",
    "CMBERTFusion",
    "ConcatFusion",
    "ConstantFusion",
    "DEQFusion",
    "DynMMFusion",
    "EarlyFusion",
    "EarlySequenceFusion",
    "ESANetFusion",
    "EncoderFusion",
    "FusionLevelDynMM",
    "FusionOutput",
    "FusionStep",
    "GradientBlendFusion",
    "LowRankTensorFusion",
    "MAGFusion",
    "MBTFusion",
    "MCANFusion",
    "MFASFusion",
    "MFMFusion",
    "MIMatrixFusion",
    "MMDynamics",
    "MMIMFusion",
    "MulTFusion",
    "MutanFusion",
    "ProFusion",
    "RefNetFusion",
    "SumFusion",
    "TensorFusion",
    "UnimodalModel",
    "WeightedSumFusion",
]
