"""Learning-rate schedules that need the run's length (the task passes ``total_steps``)."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR


def linear_warmup(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float = 0.1) -> LambdaLR:
    """BERT's schedule (``BertAdam``'s ``warmup_linear``, transformers' ``get_linear_schedule_with_warmup``):
    the factor rises linearly from 0 to 1 over the first ``warmup`` share of ``total_steps`` optimizer steps,
    then falls linearly to 0 at ``total_steps``. Step it per batch (``scheduler_interval=step``)."""
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"warmup is a share of the training steps in [0, 1), got {warmup}")
    total = max(1, int(total_steps))
    ramp = int(warmup * total)

    def factor(step: int) -> float:
        if step < ramp:
            return step / ramp
        return max(0.0, (total - step) / max(1, total - ramp))

    return LambdaLR(optimizer, factor)


def mcan_schedule(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    epochs: int,
    warmup_epochs: int = 3,
    decay_epochs: tuple[int, ...] | list[int] = (10, 12),
    decay_rate: float = 0.2,
) -> LambdaLR:
    """MCAN's schedule (MILVLG/mcan-vqa ``core/model/optim.py`` ``WarmupOptimizer`` and ``core/exec.py``):
    during epoch e (0-based) of E = ``total_steps // epochs`` optimizer steps the factor is
    ``min(1, (e + 1) / (warmup_epochs + 1))`` (1/4, 2/4, 3/4 of the base lr over the first three epochs) times
    ``decay_rate ** #{d in decay_epochs: e >= d}`` (x0.2 from the 11th epoch, x0.04 from the 13th with MCAN's
    0-based [10, 12]). Step it per batch (``scheduler_interval=step``); ``epochs``: ``trainer.max_epochs``.
    """
    if epochs < 1 or total_steps < 1:
        raise ValueError(f"mcan_schedule needs epochs >= 1 and total_steps >= 1, got {epochs}, {total_steps}")
    per_epoch = max(1, int(total_steps) // int(epochs))
    decays = sorted(int(d) for d in decay_epochs)

    def factor(step: int) -> float:  # `step` optimizer steps taken so far: the next one is in this epoch
        epoch = step // per_epoch
        warm = min(1.0, (epoch + 1) / (warmup_epochs + 1))
        return warm * decay_rate ** sum(epoch >= d for d in decays)

    return LambdaLR(optimizer, factor)
