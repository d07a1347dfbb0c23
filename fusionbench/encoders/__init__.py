"""Unimodal encoders. Contract: an `nn.Module` with an ``output_dim`` attribute whose forward takes
the modality's tensor and an optional ``context`` (feedback from a fusion, used by Pro-Fusion).
Encoders that accept a context subclass `ContextEncoder` (`context.py`)."""

from fusionbench.encoders.context import ContextEncoder, ContextJoin
from fusionbench.encoders.identity import IdentityEncoder
from fusionbench.encoders.lenet import LeNetEncoder
from fusionbench.encoders.mlp import MLPEncoder
from fusionbench.encoders.patch import PatchEncoder
from fusionbench.encoders.sequence import LSTMEncoder, TransformerSeqEncoder

__all__ = [
    "ContextEncoder",
    "ContextJoin",
    "IdentityEncoder",
    "LSTMEncoder",
    "LeNetEncoder",
    "MLPEncoder",
    "PatchEncoder",
    "TransformerSeqEncoder",
]
