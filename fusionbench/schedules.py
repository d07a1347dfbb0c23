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
