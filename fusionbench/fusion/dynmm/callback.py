"""Drives DynMM's two-stage training (`fusionbench.fusion.dynmm.DynMMFusion`) from Lightning's epoch loop.

Add it as ``+callbacks.dynmm={_target_: fusionbench.fusion.dynmm.callback.DynMMCallback}``; it does nothing
for models without a DynMM fusion. It

- at ``setup`` runs the model once on one training batch (eval mode, no gradients), so that the lazy
  layers of the built-in gates take their shapes and the experts' MAdds are measured before the
  optimizer is built and before DDP wraps the model;
- at every training epoch start sets the model's stage (I for the first ``stage1_epochs`` epochs unless
  ``stage1_ckpt`` loaded the experts, then II), the temperature (annealed over the stage-II epochs) and the
  freezing of the experts. The stage and temperature are buffers, so sanity checks, resumed runs and
  evaluations of a checkpoint use the values the checkpoint was saved with;
- logs, at the end of every validation epoch, ``val/stage2_<name>`` for each ``metrics`` entry: the
  metric in stage II, +inf (mode ``min``) or -inf (``max``) in stage I, so that checkpoint selection on it
  considers stage-II epochs only (``callbacks.model_checkpoint.monitor=val/stage2_loss``);
- keeps early stopping out of stage I and restarts its patience and best score at the switch to stage II
  (the stage-I output, the uniform mixture of the experts, is not comparable with the gated one). An
  `EarlyStopping` that monitors a ``val/stage2_*`` metric must set ``check_finite: false`` (its stage-I
  values are infinite);
- adds to the run record (`record`) the tested model's measured ms/sample, routed vs every expert
  (``dynmm_timing``, `fusionbench.fusion.dynmm.timing`), unless ``timing.samples`` is 0.

Under DDP, a run that switches stage needs ``trainer.strategy=ddp_find_unused_parameters_true`` (the gate
has no gradient in stage I, frozen experts none in stage II); a run that starts in stage II from
``stage1_ckpt`` with frozen experts works with plain DDP.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

from fusionbench.errors import ConfigError
from fusionbench.fusion.dynmm.fusion_level import FusionLevelDynMM
from fusionbench.fusion.dynmm.model import DynMMFusion

log = logging.getLogger("fusionbench")

MODES = ("min", "max")


def stage2_name(metric: str) -> str:
    """``val/loss`` -> ``val/stage2_loss``."""
    split, sep, rest = metric.partition("/")
    return f"{split}/stage2_{rest}" if sep else f"stage2_{metric}"


class DynMMCallback(pl.Callback):
    """Args:
    metrics: ``{validation metric: mode}`` to log as ``val/stage2_<name>`` (default ``{val/loss: min}``).
    manage_early_stopping: keep `EarlyStopping` callbacks from stopping in stage I and restart them at
        the switch to stage II.
    timing: ``{samples, batch_sizes, repeats}`` of the inference timing in the run record (samples 0: off).
    """

    def __init__(
        self,
        metrics: Mapping[str, str] | None = None,
        manage_early_stopping: bool = True,
        timing: Mapping[str, Any] | None = None,
    ) -> None:
        self.timing = dict(timing or {})
        self.metrics = dict(metrics) if metrics is not None else {"val/loss": "min"}
        for name, mode in self.metrics.items():
            if mode not in MODES:
                raise ConfigError(f"callbacks.dynmm.metrics.{name} must be one of {MODES}, got {mode!r}.")
        self.manage_early_stopping = bool(manage_early_stopping)
        self._stage: int | None = None

    @staticmethod
    def dynmm_model(pl_module: pl.LightningModule) -> DynMMFusion | FusionLevelDynMM | None:
        found = [m for m in pl_module.modules() if isinstance(m, (DynMMFusion, FusionLevelDynMM))]
        if len(found) > 1:
            raise ConfigError(f"The DynMM callback drives one DynMM model; this module holds {len(found)}.")
        return found[0] if found else None

    # -- setup: shapes and costs before the optimizer exists ----------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        model = self.dynmm_model(pl_module)
        if model is None:
            return
        model.driven = True
        if stage != "fit":
            return
        switches = model.stage1_epochs > 0 and not model.stage1_loaded
        ddp_kwargs = getattr(trainer.strategy, "_ddp_kwargs", None)
        if switches and ddp_kwargs is not None and not ddp_kwargs.get("find_unused_parameters", False):
            name = (
                "ddp_spawn" if getattr(trainer.strategy.launcher, "_start_method", None) == "spawn" else "ddp"
            )
            raise ConfigError(
                "DynMM switches from stage I (gate without gradient) to stage II in this run, which plain "
                f"DDP refuses; set trainer.strategy={name}_find_unused_parameters_true, or train stage I in "
                "a run of its own and start this one from it with fusion.stage1_ckpt (then frozen experts "
                "work with plain DDP)."
            )
        for cb in trainer.callbacks:
            monitor = getattr(cb, "monitor", None)
            if isinstance(cb, EarlyStopping) and monitor and "stage2_" in monitor and cb.check_finite:
                raise ConfigError(
                    f"Early stopping monitors {monitor}, which is infinite in DynMM's stage I; set "
                    "callbacks.early_stopping.check_finite=false (or monitor another metric)."
                )
            if (
                isinstance(cb, ModelCheckpoint)
                and monitor
                and "stage2_" not in monitor
                and model.stage1_epochs > 0
                and not model.stage1_loaded
            ):
                log.warning(
                    "Checkpoint selection monitors %s, which includes DynMM's stage-I epochs; DynMM "
                    "experiments select on callbacks.model_checkpoint.monitor=val/stage2_loss.",
                    monitor,
                )
        needs_shapes = any(
            isinstance(p, torch.nn.parameter.UninitializedParameter) for p in model.parameters()
        )
        dm = trainer.datamodule
        if dm is None or (not needs_shapes and bool(model.costs_measured)):
            return
        batch = next(iter(dm.train_dataloader()))
        device = next((b.device for b in model.buffers()), torch.device("cpu"))
        inputs = {m: x.to(device) if isinstance(x, torch.Tensor) else x for m, x in batch["inputs"].items()}
        modes = {m: m.training for m in model.modules()}
        try:
            model.eval()
            with torch.no_grad():
                model(inputs)
        finally:
            for m, training in modes.items():
                m.training = training

    # -- stage, temperature, freezing ----------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = self.dynmm_model(pl_module)
        if model is None:
            return
        epoch = trainer.current_epoch
        model.set_epoch(epoch)
        stage = int(model.stage)
        if self.manage_early_stopping and (stage == 1 or self._stage == 1):
            for cb in trainer.callbacks:
                if isinstance(cb, EarlyStopping):
                    cb.wait_count = 0
                    cb.stopped_epoch = 0
                    cb.best_score = torch.tensor(torch.inf if cb.monitor_op == torch.lt else -torch.inf)
        if stage != self._stage:
            log.info(
                "DynMM: epoch %d trains stage %s (temperature %.4g).",
                epoch,
                "I" if stage == 1 else "II",
                float(model.temperature),
            )
        self._stage = stage

    # -- stage-II metrics for checkpoint selection ---------------------------------------------------
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = self.dynmm_model(pl_module)
        if model is None or trainer.sanity_checking:
            return
        stage = int(model.stage)
        for name, mode in self.metrics.items():
            value = trainer.callback_metrics.get(name)
            if stage == 2 and value is None:
                continue
            if stage == 1:
                value = torch.tensor(torch.inf if mode == "min" else -torch.inf)
            pl_module.log(
                stage2_name(name),
                torch.as_tensor(value, dtype=torch.float32).detach(),
                on_step=False,
                on_epoch=True,
            )

    # -- run record --------------------------------------------------------------------------------
    def record(self, task: pl.LightningModule, datamodule: Any, tested: bool, **_: Any) -> dict[str, Any]:
        """``{"dynmm_timing": ...}`` for a tested DynMM model (``task`` holds the tested weights). Never
        raises: timing must not end a finished run; a failure is stored as ``{"error": ...}``."""
        model = self.dynmm_model(task)
        samples = int(self.timing.get("samples", 0))
        trainer = task._trainer  # set while attached; a fast dev run writes no record to time for
        if model is None or not tested or samples <= 0 or (trainer is not None and trainer.fast_dev_run):
            return {}
        from fusionbench.fusion.dynmm.timing import first_test_inputs, time_routing

        try:
            device = next(task.parameters()).device
            inputs = first_test_inputs(datamodule, samples, device)
            batch_sizes, repeats = (
                list(self.timing.get("batch_sizes", [1])),
                int(self.timing.get("repeats", 3)),
            )
            if isinstance(model, FusionLevelDynMM):  # routed vs static ESANet, ms per image
                return {"dynmm_timing": model.time_routing(inputs, batch_sizes, repeats)}
            timing = time_routing(model, inputs, batch_sizes, repeats)
        except Exception as exc:  # noqa: BLE001
            log.warning(
                "Could not time DynMM's routing (%s: %s); the record stores the error.",
                type(exc).__name__,
                exc,
            )
            timing = {"error": f"{type(exc).__name__}: {exc}"}
        return {"dynmm_timing": timing}


__all__ = ["DynMMCallback", "stage2_name"]
