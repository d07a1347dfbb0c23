"""Small DynMM models and batches shared by the DynMM tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fusionbench.encoders import MLPEncoder
from fusionbench.fusion import DynMMFusion

EXPERTS = {
    "uni": {"fusion": "unimodal", "modalities": ["a"]},
    "late": {"fusion": "concat", "modalities": "all"},
}
CALLBACK = "+callbacks.dynmm={_target_: fusionbench.fusion.dynmm.callback.DynMMCallback}"


def encoders() -> dict[str, nn.Module]:
    return {"a": MLPEncoder(5, [8]), "b": MLPEncoder(7, [6])}


def batch(n: int = 16, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(n, 5, generator=g), "b": torch.randn(n, 7, generator=g)}


def model(**kw) -> DynMMFusion:
    torch.manual_seed(0)
    args = {"experts": EXPERTS, "stage1_epochs": 0, "resource_weight": 0.5}
    args.update(kw)
    m = DynMMFusion(encoders(), 3, **args)
    m.bind_task_loss(lambda logits, target: F.cross_entropy(logits, target))
    return m


def bias_gate(m: DynMMFusion) -> None:
    """Make the gate's decisions depend on the sample so that both experts get samples."""
    with torch.no_grad():
        m.gate(batch(2))  # materialise the lazy layers
        last = m.gate.net[-1]
        last.weight.mul_(10.0)
