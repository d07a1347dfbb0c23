"""Lightning callbacks that write run artefacts beside metrics.json."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from fusionbench.fusion.deq import DEQFusion
from fusionbench.fusion.mmdynamics import MMDynamics


def deq_diagnostics(model: nn.Module, inputs: dict[str, torch.Tensor], steps: int = 100) -> dict[str, Any] | None:
    """Convergence traces and gate shares of the DEQ fusion inside ``model`` (None if there is none)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # Pro-Fusion: the solve of its last unroll step, on that step's encoder outputs
            last = model.unroll(inputs)[-1].embeddings if hasattr(model, "unroll") else None
            inner = model.base if last is not None else model
            if isinstance(inner, MMDynamics) and isinstance(inner.fusion, DEQFusion):
                deq, embeddings = inner.fusion, last if last is not None else inner.features(inputs)[0]
            elif isinstance(inner, DEQFusion):
                deq, embeddings = inner, last if last is not None else inner.encode(inputs)
            else:
                return None
            return {"steps": steps, "batch_size": len(next(iter(inputs.values()))), "mode": deq.mode, **deq.trace(embeddings, steps)}
    finally:
        model.train(was_training)


def write_json(path: str | Path, data: dict) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


class DEQDiagnostics(pl.Callback):
    """After testing, trace the DEQ fusion on the first test batch and write ``path`` (Table 8,
    Figures 3-4). Does nothing for models without DEQ fusion.

    Args:
        path: output JSON file, normally ``<output_dir>/diagnostics.json``.
        steps: solver / iteration steps to trace.
    """

    def __init__(self, path: str, steps: int = 100) -> None:
        self.path, self.steps = path, steps

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.datamodule is None:
            return
        batch = next(iter(trainer.datamodule.test_dataloader()))
        inputs = {m: x.to(pl_module.device) for m, x in batch["inputs"].items()}
        result = deq_diagnostics(pl_module.model, inputs, self.steps)
        if result is not None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            write_json(self.path, result)
