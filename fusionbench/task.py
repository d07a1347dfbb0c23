"""One LightningModule for multiclass, multilabel, regression, VQA and segmentation fusion tasks.

The dataset's ``task_type`` picks the loss and the metric collection; the fusion model's
``aux_loss`` is added to the loss, and every scalar in its ``info`` is logged.

Segmentation (ESANet's recipe, shared by DynMM's NYUv2 code): pixel cross-entropy weighted by the
dataset's ``class_weights`` with void (``-1``) ignored, averaged as ``F.cross_entropy`` does (sum of the
weighted pixel losses / sum of the weights of the non-void pixels = ESANet's ``CrossEntropyLoss2d``). The
main logits are upsampled bilinearly to the label size when they differ; a model's multi-scale side outputs
(``extras["side_logits"]``, training only) add the same loss each against the label downsampled with nearest
interpolation to their size (ESANet sums the scales; ``cv2.INTER_NEAREST`` and torch ``nearest`` pick the
same pixels).
"""

from __future__ import annotations

import inspect
import re
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from fusionbench.errors import TrainingError
from fusionbench.metrics import make_metrics, prepare_for_metrics


def segmentation_loss(
    logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Weighted pixel cross-entropy of ``(B, C, h, w)`` logits against ``(B, H, W)`` labels (void ``-1``);
    logits of another size are upsampled bilinearly (``align_corners=False``) to the labels'."""
    if tuple(logits.shape[-2:]) != tuple(target.shape[-2:]):
        logits = F.interpolate(logits, size=tuple(target.shape[-2:]), mode="bilinear", align_corners=False)
    weight = None if class_weights is None else class_weights.to(logits.device, logits.dtype)
    return F.cross_entropy(logits, target.long(), weight=weight, ignore_index=-1)


def side_outputs_loss(
    side_logits: Sequence[torch.Tensor], target: torch.Tensor, class_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Sum of `segmentation_loss` over multi-scale side outputs, each against the labels downsampled with
    nearest interpolation to its own size (a void label stays void: -1 is copied, never averaged)."""
    total = target.new_zeros((), dtype=torch.float32)
    for side in side_logits:
        size = tuple(side.shape[-2:])
        small = target
        if tuple(target.shape[-2:]) != size:
            small = F.interpolate(target[:, None].float(), size=size, mode="nearest")[:, 0].long()
        total = total + segmentation_loss(side, small, class_weights)
    return total


def task_loss(
    task_type: str,
    logits: torch.Tensor,
    target: torch.Tensor,
    regression_loss: str = "mse",
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The task's loss of the main output (``class_weights``: segmentation only)."""
    if task_type == "regression" and regression_loss == "l1":  # MOSI/MOSEI models train on L1
        return F.l1_loss(logits.reshape(target.shape).float(), target.float())
    if task_type == "multiclass":
        return F.cross_entropy(logits, target.long())
    if task_type == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, target.float())
    if task_type == "vqa":  # MCAN: BCE on the soft answer scores, summed over answers, mean over the batch
        return F.binary_cross_entropy_with_logits(logits, target.float(), reduction="sum") / len(target)
    if task_type == "regression":
        return F.mse_loss(logits.reshape(target.shape).float(), target.float())
    if task_type == "segmentation":
        return segmentation_loss(logits, target, class_weights)
    raise ValueError(f"unknown task_type {task_type!r}")


class FusionTask(pl.LightningModule):
    """Args:
    model: a fusion model (returns `FusionOutput`).
    task_type: ``multiclass``, ``multilabel``, ``regression``, ``vqa`` or ``segmentation``.
    num_outputs: model outputs (classes, labels, targets).
    optimizer: partial optimizer, called with the parameters.
    scheduler: optional partial LR scheduler, called with the optimizer; stepped per epoch.
    check_finite: stop with a `TrainingError` naming the step when the loss is NaN or infinite.
    regression_loss: ``mse`` or ``l1`` for regression tasks (the dataset's ``regression_loss``).
    extra_metrics: names of extra metrics (the dataset's ``extra_metrics``, `fusionbench.metrics`).
    optimizer_groups: per-group settings ``[{"match": regex, "lr": x, "weight_decay": y}, ...]``: a
        parameter joins the first group whose regex matches its name (``model.encoders.text...``), else the
        default group (the optimizer's own lr and weight decay). Frozen parameters are left out.
    scheduler_interval: ``epoch`` or ``step`` (warmups such as `fusionbench.schedules.linear_warmup`).
        A scheduler factory that takes ``total_steps`` gets the trainer's estimated optimizer steps.
    scheduler_monitor: the logged metric a ``ReduceLROnPlateau`` scheduler steps on (e.g. ``val/f1_micro``).
    class_weights: per-class loss weights of a segmentation dataset (its ``class_weights``, median
        frequency on the training split). Kept as the buffer ``class_weights``: it follows the module's
        device and is saved in checkpoints; a checkpoint without it (older runs) loads and keeps the given
        weights, and one with it restores them.
    """

    def __init__(
        self,
        model: nn.Module,
        task_type: str,
        num_outputs: int,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        check_finite: bool = True,
        regression_loss: str = "mse",
        extra_metrics: tuple[str, ...] | list[str] = (),
        optimizer_groups: Sequence[Mapping[str, Any]] | None = None,
        scheduler_interval: str = "epoch",
        scheduler_monitor: str | None = None,
        class_weights: Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if scheduler_interval not in ("epoch", "step"):
            raise TrainingError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}.")
        self.optimizer_groups = [dict(g) for g in optimizer_groups or []]
        self.scheduler_interval = scheduler_interval
        self.scheduler_monitor = scheduler_monitor
        self.model = model
        self.task_type = task_type
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.check_finite = check_finite
        if regression_loss not in ("mse", "l1"):
            raise ValueError(f"regression_loss must be 'mse' or 'l1', got {regression_loss!r}")
        self.regression_loss = regression_loss
        if class_weights is not None and task_type != "segmentation":
            raise TrainingError(
                f"class_weights are a segmentation setting; task_type is {task_type!r}. Drop them (the "
                "datamodule's `class_weights`) or use a segmentation dataset."
            )
        weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        if weights is not None and weights.shape != (num_outputs,):
            raise TrainingError(
                f"class_weights must hold one weight per class ({num_outputs}); got shape "
                f"{tuple(weights.shape)}. Check the datamodule's `class_weights` and `num_outputs`."
            )
        self.class_weights: torch.Tensor | None
        self.register_buffer("class_weights", weights)
        self._bind_task_loss()
        self.extra_metrics = tuple(extra_metrics)
        metrics = make_metrics(task_type, num_outputs, self.extra_metrics)
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        # the models' `info` scalars, one MeanMetric each (made at first use): under DDP a plain logged value
        # would be the mean of the ranks' means, wrong when ranks hold different numbers of samples
        self.info_means = nn.ModuleDict()
        # wall time of earlier attempts (from the checkpoint a run resumes) and the start of this one
        self.wall_time_before_s = 0.0
        self.attempt_start = time.time()

    def _bind_task_loss(self) -> None:
        """Give models whose ``target_loss`` needs the task's own loss (DynMM's stage I) that loss."""
        if hasattr(self.model, "bind_task_loss"):
            self.model.bind_task_loss(
                partial(
                    task_loss,
                    self.task_type,
                    regression_loss=self.regression_loss,
                    class_weights=self.class_weights,  # moved to the logits' device per call
                )
            )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # checkpoints from before `class_weights` existed lack the buffer: keep this task's weights; a task
        # built without weights adopts the checkpoint's (a None buffer would call the key unexpected)
        key = prefix + "class_weights"
        if key not in state_dict and self.class_weights is not None:
            state_dict[key] = self.class_weights.detach().clone()
        elif key in state_dict and self.class_weights is None:
            self.class_weights = state_dict[key].detach().clone().to(self.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        self._bind_task_loss()

    def wall_time_s(self) -> float:
        """Seconds spent on this run, over every attempt up to its last checkpoint and this one."""
        return self.wall_time_before_s + time.time() - self.attempt_start

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["fusionbench_wall_time_s"] = self.wall_time_s()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # only a resumed fit continues the clock: testing the selected checkpoint must not add its training
        # time to this attempt's (which already counts it), nor set the clock back to that epoch
        trainer = self._trainer
        if trainer is None or trainer.state.fn == "fit":
            self.wall_time_before_s = float(checkpoint.get("fusionbench_wall_time_s", 0.0))

    def forward(self, inputs: Mapping[str, torch.Tensor]):
        return self.model(inputs)

    def _step(self, batch: Mapping[str, Any], stage: str) -> torch.Tensor:
        out = self.model(batch["inputs"])
        target = batch["target"]
        loss = task_loss(self.task_type, out.logits, target, self.regression_loss, self.class_weights)
        total = (
            loss if out.aux_loss is None else loss + out.aux_loss
        )  # each model weights its own terms (jac_weight, resource_weight λ, ref_weight)
        side = (out.extras or {}).get("side_logits") if self.task_type == "segmentation" else None
        if side:  # multi-scale supervision (ESANet); `loss` stays the main output's, comparable with val
            side_loss = side_outputs_loss(side, target, self.class_weights)
            total = total + side_loss
            self.log(
                f"{stage}/side_loss",
                side_loss,
                on_step=False,
                on_epoch=True,
                batch_size=target.shape[0],
                sync_dist=True,
            )
        if hasattr(self.model, "target_loss"):
            model_loss = self.model.target_loss(out, target)
            total = total + model_loss
            self.log(
                f"{stage}/model_loss",
                model_loss,
                on_step=False,
                on_epoch=True,
                batch_size=target.shape[0],
                sync_dist=True,
            )
        n = target.shape[0]
        sync = True  # epoch-level values are reduced across DDP ranks once per epoch
        self.log(
            f"{stage}/loss",
            loss,
            on_step=False,
            on_epoch=True,
            batch_size=n,
            sync_dist=sync,
            prog_bar=stage == "val",
        )
        if out.aux_loss is not None:
            self.log(
                f"{stage}/aux_loss", out.aux_loss, on_step=False, on_epoch=True, batch_size=n, sync_dist=sync
            )
        for key, value in out.info.items():  # batch-weighted means, pooled over the ranks' samples
            name = f"{stage}/{key}"
            attribute = name.replace(".", "_")
            if attribute not in self.info_means:
                self.info_means[attribute] = MeanMetric().to(self.device)
            mean = self.info_means[attribute]
            mean.update(torch.as_tensor(value, dtype=torch.float32, device=self.device).detach(), n)
            self.log(name, mean, on_step=False, on_epoch=True, metric_attribute=f"info_means.{attribute}")
        metrics = getattr(self, f"{stage}_metrics")
        # batch["meta"] (VQA: answer types, question ids) reaches the metrics whose update() takes those keys
        meta = batch.get("meta") or {}
        metrics.update(*prepare_for_metrics(self.task_type, out.logits.detach(), target), **meta)
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=n)
        return total

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        total = self._step(batch, "train")
        if self.check_finite and not torch.isfinite(total.detach()).all():
            raise TrainingError(
                f"The training loss became {total.item()} at epoch {self.current_epoch}, global step "
                f"{self.global_step} (batch {batch_idx}). Lower the learning rate (`optimizer.lr`), clip "
                "gradients (`trainer.gradient_clip_val=1.0`) or check the inputs for NaN/inf values."
            )
        return total

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        """Unlabeled prediction (VQA test-dev): the logits' argmax and the batch's ``meta`` (question ids);
        segmentation: the class map ``(B, h, w)`` at the model's output size (argmax over the class axis)."""
        out = self.model(batch["inputs"])
        dim = 1 if self.task_type == "segmentation" else -1
        return {"index": out.logits.argmax(dim), **(batch.get("meta") or {})}

    def teardown(self, stage: str) -> None:
        # ddp_spawn workers exit right after this hook. Closing the process group here, on every rank
        # after a barrier, keeps ranks from tearing gloo down at interpreter exit at different times,
        # which intermittently aborts a worker ("terminate called without an active exception").
        launcher = getattr(self.trainer.strategy, "launcher", None)
        if getattr(launcher, "_start_method", None) == "spawn" and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    def param_groups(self) -> list[dict[str, Any]]:
        """The trainable parameters, split by ``optimizer_groups`` (first matching regex wins)."""
        groups: list[dict[str, Any]] = [{"params": []}]
        patterns = []
        for i, g in enumerate(self.optimizer_groups):
            unknown = sorted(set(g) - {"match", "lr", "weight_decay"})
            if "match" not in g or unknown:
                raise TrainingError(
                    f"optimizer_groups[{i}]={g} needs `match` (a regex over parameter names) and may set only"
                    f" lr and weight_decay (unknown: {unknown})."
                )
            patterns.append(re.compile(str(g["match"])))
            groups.append({k: v for k, v in g.items() if k != "match"} | {"params": []})
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            hit = next((i + 1 for i, pat in enumerate(patterns) if pat.search(name)), 0)
            groups[hit]["params"].append(p)
        empty = [
            self.optimizer_groups[i - 1]["match"] for i in range(1, len(groups)) if not groups[i]["params"]
        ]
        if empty:
            raise TrainingError(
                f"optimizer_groups match no trainable parameter: {empty}. Parameter names look like "
                f"{[n for n, _ in self.named_parameters()][:3]}."
            )
        return [g for g in groups if g["params"]]

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.param_groups())
        if self.scheduler_factory is None:
            return optimizer
        factory = self.scheduler_factory
        wants = inspect.signature(getattr(factory, "func", factory)).parameters
        extra = (
            {"total_steps": int(self.trainer.estimated_stepping_batches)} if "total_steps" in wants else {}
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": factory(optimizer=optimizer, **extra),
                "interval": self.scheduler_interval,
                **({"monitor": self.scheduler_monitor} if self.scheduler_monitor else {}),
            },
        }
