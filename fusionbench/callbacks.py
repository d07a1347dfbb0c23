"""Callbacks every run uses whatever its method: `EpochCheckpoint`. Method-specific callbacks live in their
method's package (`fusionbench.fusion.deq.callbacks`, `fusionbench.fusion.dynmm.callback`,
`fusionbench.fusion.gradient_blend.callback`), sit in the default callback set and do nothing for other
models.

The run record protocol: a callback with ``record(task=, datamodule=, tested=) -> dict`` adds those entries to
``metrics.json`` after testing (``task`` then holds the tested weights); `fusionbench.train` calls it and
knows no method by name."""

from __future__ import annotations

import logging
import os
import random
import signal
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

log = logging.getLogger("fusionbench")


def _numpy_state() -> tuple:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return name, torch.from_numpy(keys.copy()), int(pos), int(has_gauss), float(cached)


def _interrupt_if_asked(trainer: pl.Trainer) -> None:
    """Fault injection for resume tests, outside the config so that it does not change the run's config hash:
    ``FUSIONBENCH_KILL_AFTER_EPOCH=k`` sends this process ``FUSIONBENCH_KILL_SIGNAL`` (``KILL`` as a crash
    does, or ``INT`` as Ctrl-C does) once epoch k's ``last.ckpt`` is written."""
    epoch = os.environ.get("FUSIONBENCH_KILL_AFTER_EPOCH")
    if epoch is not None and trainer.current_epoch == int(epoch) and not trainer.sanity_checking:
        name = os.environ.get("FUSIONBENCH_KILL_SIGNAL", "KILL")
        log.warning("FUSIONBENCH_KILL_AFTER_EPOCH=%s: sending SIG%s to this process", epoch, name)
        os.kill(os.getpid(), getattr(signal, f"SIG{name}"))


class EpochCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` whose ``last.ckpt`` is rewritten at the end of every epoch, and which stores the
    random number generators' states in every checkpoint it writes.

    Lightning 2.6 rewrites ``last.ckpt`` only when a top-k checkpoint is saved in the same step, so a
    resumed run restarted from the best epoch instead of the latest. With the generators restored too, a
    run killed after epoch k and resumed from ``last.ckpt`` draws the same shuffles and dropout masks as an
    uninterrupted one, and ends with the same metrics.
    """

    RNG_KEY = "fusionbench_rng"

    def _save_last_if_missed(self, trainer: pl.Trainer) -> None:
        if (
            self.save_last
            and not self._should_skip_saving_checkpoint(trainer)
            and self._last_global_step_saved != trainer.global_step
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)
            _interrupt_if_asked(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)
            _interrupt_if_asked(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning 2.6 writes last.ckpt here even under fast_dev_run, where it skips every other save; that
        # checkpoint then reads as an unfinished run of another configuration and blocks the folder's real run
        if not trainer.fast_dev_run:
            super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[self.RNG_KEY] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": _numpy_state(),  # tensors and plain types: checkpoints stay loadable with weights_only
            "python": random.getstate(),
        }

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = checkpoint.get(self.RNG_KEY)
        if state is None:  # a checkpoint from before this callback: nothing to restore
            return
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
        random.setstate(state["python"])


class EpochLog(pl.Callback):
    """The run's training curves: one line per epoch in its log (``train.log`` beside the record, so a run
    sent to a file, as on SLURM without a progress bar, shows its progress) and the record's ``history``,
    one entry per epoch with every epoch-level ``train/`` and ``val/`` metric.

    Lightning computes an epoch's training means after its validation, so each entry is filled twice: the
    ``val/`` values when validation ends, the ``train/`` values when the epoch ends, and the line is logged
    then. The history travels in the checkpoints, which Lightning writes when the epoch ends, after this
    callback (checkpoint callbacks run last), so a resumed run's history is an uninterrupted one's. Where
    checkpoints are written when validation ends instead (validation more than once an epoch, or not every
    epoch), a run killed after one has no ``train/`` values for that epoch (Lightning never computed them),
    and its entry says ``"resumed": true``."""

    def __init__(self, keys: tuple[str, ...] = ("train/loss", "val/loss")) -> None:
        self.keys = tuple(keys)
        self.history: list[dict[str, Any]] = []

    def _entry(self, epoch: int) -> dict[str, Any]:
        if not self.history or self.history[-1]["epoch"] != epoch:
            self.history.append({"epoch": epoch})
        return self.history[-1]

    @staticmethod
    def _epoch_metrics(trainer: pl.Trainer, prefix: str) -> dict[str, float]:
        out = {}
        for key, value in trainer.callback_metrics.items():
            if key.startswith(prefix) and not key.endswith("_step"):
                try:
                    out[key] = float(value)
                except (TypeError, ValueError):  # a non-scalar logged value: not a curve
                    continue
        return out

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._entry(trainer.current_epoch).update(self._epoch_metrics(trainer, "val/"))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        entry = self._entry(trainer.current_epoch)
        entry.update(self._epoch_metrics(trainer, "train/"))
        if not trainer.is_global_zero:
            return
        monitor = getattr(trainer.checkpoint_callback, "monitor", None)
        shown = [k for k in (*self.keys, monitor) if k and k in entry]
        values = ", ".join(f"{k}={entry[k]:.4g}" for k in dict.fromkeys(shown))
        log.info(
            "epoch %d/%s: %s", trainer.current_epoch, trainer.max_epochs, values or "(no metrics logged)"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(entry) for entry in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.history:  # testing the selected checkpoint after fit: its history stops at its epoch
            return
        self.history = [dict(entry) for entry in state_dict.get("history", [])]
        for entry in self.history:  # the epochs whose training means the interrupted attempt never computed
            if not any(k.startswith("train/") for k in entry):
                entry["resumed"] = True

    def record(self, **_: Any) -> dict[str, Any]:
        return {"history": self.history} if self.history else {}
