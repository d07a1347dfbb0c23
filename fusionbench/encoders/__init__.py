"""Unimodal encoders. Contract: an `nn.Module` with an ``output_dim`` attribute whose forward takes
the modality's tensor and an optional ``context`` (feedback from a fusion, used by Pro-Fusion).
Encoders that accept a context subclass `ContextEncoder` (`context.py`)."""

from fusionbench.encoders.context import ContextEncoder, ContextJoin
from fusionbench.encoders.identity import IdentityEncoder, SequenceIdentityEncoder, TokenIdentityEncoder
from fusionbench.encoders.image import PretrainedImageEncoder
from fusionbench.encoders.lenet import LeNetEncoder
from fusionbench.encoders.mlp import MLPEncoder
from fusionbench.encoders.patch import PatchEncoder
from fusionbench.encoders.pretrained import PretrainedTextEncoder
from fusionbench.encoders.resnet import ResNetTrunk
from fusionbench.encoders.sequence import GRUEncoder, LSTMEncoder, TransformerSeqEncoder
from fusionbench.encoders.tokens import TokenEncoder

__all__ = [
    "ContextEncoder",
    "ContextJoin",
    "GRUEncoder",
    "IdentityEncoder",
    "LSTMEncoder",
    "LeNetEncoder",
    "MLPEncoder",
    "PatchEncoder",
    "PretrainedImageEncoder",
    "PretrainedTextEncoder",
    "ResNetTrunk",
    "SequenceIdentityEncoder",
    "TokenEncoder",
    "TokenIdentityEncoder",
    "TransformerSeqEncoder",
]
