"""Unimodal encoders. Contract: an `nn.Module` with an ``output_dim`` attribute whose forward takes
the modality's tensor and an optional ``context`` (feedback from a fusion, used by Pro-Fusion)."""
from fusionbench.encoders.identity import IdentityEncoder
from fusionbench.encoders.mlp import MLPEncoder

__all__ = ["IdentityEncoder", "MLPEncoder"]
