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
    """One line per epoch in the run's log (``train.log`` beside the record): the epoch's logged metrics, so a
    run sent to a file (as on SLURM, without a progress bar) shows its progress."""

    def __init__(self, keys: tuple[str, ...] = ("train/loss", "val/loss")) -> None:
        self.keys = tuple(keys)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        monitor = getattr(trainer.checkpoint_callback, "monitor", None)
        shown = [k for k in (*self.keys, monitor) if k and k in metrics]
        values = ", ".join(f"{k}={float(metrics[k]):.4g}" for k in dict.fromkeys(shown))
        log.info(
            "epoch %d/%s: %s", trainer.current_epoch, trainer.max_epochs, values or "(no metrics logged)"
        )
