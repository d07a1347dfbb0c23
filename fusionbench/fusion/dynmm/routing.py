"""DynMM's decisions (eq. 5 and the public code's deterministic form), temperature annealing, resource loss
(eq. 3) and the per-sample split that hard routing needs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F


def straight_through(soft: torch.Tensor) -> torch.Tensor:
    """One-hot of the argmax in the forward pass, the gradient of ``soft`` in the backward pass."""
    index = soft.argmax(dim=-1, keepdim=True)
    hard = torch.zeros_like(soft).scatter_(-1, index, 1.0)
    return hard - soft.detach() + soft


def gumbel_softmax_st(
    logits: torch.Tensor, tau: float, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(straight-through hard g, soft g̃) of eq. 5; ``noise`` are Gumbel(0, 1) draws (drawn when None)."""
    if noise is None:
        noise = -torch.empty_like(logits).exponential_().log()
    soft = F.softmax((logits + noise) / tau, dim=-1)
    return straight_through(soft), soft


def softmax_st(logits: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(straight-through hard g, soft g̃) of a deterministic temperature softmax (the public code)."""
    soft = F.softmax(logits / tau, dim=-1)
    return straight_through(soft), soft


def anneal_temperature(
    epoch: int, start: float, end: float, anneal_epochs: int, schedule: str = "exp"
) -> float:
    """τ after ``epoch`` epochs of annealing: ``exp`` start·(end/start)^(k/N) (the public code's
    ExpDecayTemp), ``linear`` start + (end - start)·k/N, with k = min(epoch, N); N = 0: constant ``start``."""
    if anneal_epochs <= 0:
        return float(start)
    k = min(max(int(epoch), 0), int(anneal_epochs)) / anneal_epochs
    if schedule == "exp":
        return float(start * (end / start) ** k)
    return float(start + (end - start) * k)


def resource_loss(g: torch.Tensor, costs: torch.Tensor) -> torch.Tensor:
    """Σ_i g_i C_i averaged over the batch (eq. 3 without λ); ``g`` is (B, experts)."""
    return (g * costs.to(g.dtype)).sum(dim=-1).mean()


def take(inputs: Any, index: torch.Tensor | slice) -> Any:
    """The samples ``index`` of a batch (tensors indexed along dim 0, mappings recursively)."""
    if isinstance(inputs, torch.Tensor):
        return inputs[index]
    if isinstance(inputs, Mapping):
        return {k: take(v, index) for k, v in inputs.items()}
    return inputs
