"""DEQ fusion's callbacks: `DEQMonitor` (per-epoch solver convergence, warnings, the run record's
``deq_solver``) and `DEQDiagnostics` (convergence traces after testing, Table 8 and Figures 3-4). Both do
nothing for models without DEQ fusion, so the default callback set carries them."""

from __future__ import annotations

import logging
import math
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from fusionbench.fusion.deq.model import DEQFusion
from fusionbench.records import write_json

log = logging.getLogger("fusionbench")


def is_deq(module: nn.Module) -> bool:
    """A DEQ fusion layer: `DEQFusion`, or one with its solver statistics and trace (CM-BERT + DEQ)."""
    return isinstance(module, DEQFusion) or all(
        hasattr(module, a) for a in ("forward_stats", "backward_stats", "trace", "mode")
    )


def deq_diagnostics(
    model: nn.Module, inputs: dict[str, torch.Tensor], steps: int = 100
) -> dict[str, Any] | None:
    """Convergence traces and gate shares of the DEQ fusion inside ``model`` (None if there is none)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # Pro-Fusion: the solve of its last unroll step, on that step's encoder outputs
            last = model.unroll(inputs)[-1].embeddings if hasattr(model, "unroll") else None
            inner = model.base if last is not None else model
            from fusionbench.fusion.mmdynamics import MMDynamics  # imports this package: not at module level

            if isinstance(inner, MMDynamics) and isinstance(inner.fusion, DEQFusion):
                deq, embeddings = inner.fusion, last if last is not None else inner.features(inputs)[0]
            elif is_deq(inner):
                deq, embeddings = inner, last if last is not None else inner.encode(inputs)
            elif hasattr(inner, "deq_inputs") and last is None:  # a DEQ layer inside a model (MCAN, Mutan)
                deq, embeddings = inner.deq_inputs(inputs)
                if deq is None:
                    return None
            else:
                return None
            return {
                "steps": steps,
                "batch_size": len(next(iter(inputs.values()))),
                "mode": deq.mode,
                **deq.trace(embeddings, steps),
            }
    finally:
        model.train(was_training)


def finite_or_none(value: Any) -> Any:
    """``value`` with every NaN / inf float replaced by None (a diverging plain iteration traces to inf; the
    plotted artefact stays strict JSON and the plots leave those points out)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    return value


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
            write_json(self.path, finite_or_none(result), indent=1, sort_keys=False, allow_nan=False)


def _merge(parts: list[dict[str, float]]) -> dict[str, float]:
    """Shares of several `SolveStats.summary()` dicts, weighted by their solve counts."""
    parts = [p for p in parts if p]
    n = sum(p["solves"] for p in parts)
    if not n:
        return {}
    return {
        "solves": n,
        **{k: sum(p[k] * p["solves"] for p in parts) / n for k in ("converged", "fallback", "rel_residual")},
    }


class DEQMonitor(pl.Callback):
    """Per-epoch convergence of every DEQ fusion in the model: logs the share of forward solves that
    converged (residual within ``failure_tol``) at train / val / test and of backward (implicit) solves
    that passed their residual check (the rest fell back to the phantom gradient), warns when a
    validation or test split was evaluated on unconverged solves, and hands the history and the test
    shares to the run record (``deq_solver``). Does nothing for models without DEQ fusion.

    Args:
        warn_every: repeat a training or validation warning at most every this many epochs.
    """

    def __init__(self, warn_every: int = 25) -> None:
        self.warn_every = warn_every
        self.history: list[dict[str, Any]] = []
        self.test: dict[str, float] = {}
        self._last_warned = self._last_val_warned = -(10**9)

    @staticmethod
    def _stats(pl_module: pl.LightningModule, kind: str) -> list:
        """The `SolveStats` of every DEQ fusion in the model: ``kind`` is train, eval or backward."""
        deqs = [m for m in pl_module.modules() if is_deq(m)]
        return [d.backward_stats if kind == "backward" else d.forward_stats[kind] for d in deqs]

    def _reset(self, pl_module: pl.LightningModule, kind: str) -> None:
        for stats in self._stats(pl_module, kind):
            stats.reset()

    def _summary(self, pl_module: pl.LightningModule, kind: str) -> dict[str, float]:
        return _merge([s.summary() for s in self._stats(pl_module, kind)])

    def _log(self, pl_module: pl.LightningModule, prefix: str, summary: dict[str, float]) -> None:
        for key in ("converged", "rel_residual") + (("fallback",) if prefix.endswith("b") else ()):
            pl_module.log(f"{prefix}_{key}", summary[key], on_epoch=True, sync_dist=True)

    # -- training ------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset(pl_module, "train")
        self._reset(pl_module, "backward")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        forward, backward = self._summary(pl_module, "train"), self._summary(pl_module, "backward")
        if not forward:
            return
        self._log(pl_module, "train/deq/f", forward)
        entry: dict[str, Any] = {
            "epoch": trainer.current_epoch,
            "train_f_converged": round(forward["converged"], 4),
        }
        if backward:
            self._log(pl_module, "train/deq/b", backward)
            entry["train_b_converged"] = round(backward["converged"], 4)
        if self.history and self.history[-1]["epoch"] == trainer.current_epoch:  # validation wrote first
            self.history[-1].update(entry)
        else:
            self.history.append(entry)
        bad = forward["converged"] < 1 or (backward and backward["converged"] < 1)
        if bad and trainer.current_epoch - self._last_warned >= self.warn_every:
            self._last_warned = trainer.current_epoch
            log.warning(
                "DEQ fusion, epoch %d: %.1f%% of forward solves converged; %s. Training goes on (this "
                "repeats at most every %d epochs; the shares are logged per epoch as train/deq/f_converged "
                "and train/deq/b_converged).",
                trainer.current_epoch,
                100 * forward["converged"],
                f"{100 * backward['converged']:.1f}% of backward solves passed their check, the rest used "
                "the phantom gradient"
                if backward
                else "no implicit backward solves",
                self.warn_every,
            )

    # -- evaluation ----------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset(pl_module, "eval")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        summary = self._summary(pl_module, "eval")
        if not summary or trainer.sanity_checking:
            return
        self._log(pl_module, "val/deq/f", summary)
        entry = {"epoch": trainer.current_epoch, "val_f_converged": round(summary["converged"], 4)}
        if self.history and self.history[-1]["epoch"] == trainer.current_epoch:
            self.history[-1].update(entry)
        else:
            self.history.append(entry)
        if summary["converged"] < 1 and trainer.current_epoch - self._last_val_warned >= self.warn_every:
            self._last_val_warned = trainer.current_epoch
            log.warning(
                "DEQ fusion, epoch %d: only %.1f%% of validation samples' forward solves converged "
                "(residual within fusion.failure_tol); their metrics, and a checkpoint selected on them, "
                "come from unconverged solves (repeats at most every %d epochs; logged per epoch as "
                "val/deq/f_converged).",
                trainer.current_epoch,
                100 * summary["converged"],
                self.warn_every,
            )

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset(pl_module, "eval")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        summary = self._summary(pl_module, "eval")
        if not summary:
            return
        self._log(pl_module, "test/deq/f", summary)
        self.test = {k: round(summary[k], 6) for k in ("solves", "converged", "rel_residual")}
        if summary["converged"] < 1:
            log.warning(
                "DEQ fusion: only %.1f%% of test samples' forward solves converged (residual within "
                "fusion.failure_tol); the test metrics are of unconverged solves, and tables flag this run.",
                100 * summary["converged"],
            )

    # -- run record and resuming ---------------------------------------------------------------
    def record(self, test_metrics: dict[str, float] | None = None, **_: Any) -> dict[str, Any]:
        """The run record's ``deq_solver`` entry: test shares and the per-epoch history (empty: no DEQ).

        Under ddp_spawn the test ran in other processes and this callback counted nothing; its shares then
        come from the logged ``test/deq/f_*`` metrics (rank means, without the solve count)."""
        test = self.test or {
            key: round(float(test_metrics[f"test/deq/f_{key}"]), 6)
            for key in ("converged", "rel_residual")
            if f"test/deq/f_{key}" in (test_metrics or {})
        }
        if not test and not self.history:
            return {}
        return {"deq_solver": {"test_forward": test, "epochs": self.history}}

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "last_warned": self._last_warned}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self.history:  # resuming a fit; testing a selected checkpoint keeps the full history
            self.history = list(state_dict.get("history", []))
        self._last_warned = state_dict.get("last_warned", self._last_warned)
