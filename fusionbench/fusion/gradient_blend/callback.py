"""Gradient-blending weight estimation (Wang, Tran & Feiszli 2020) as a Lightning callback; the model
side is `fusionbench.fusion.gradient_blend.GradientBlendFusion`.

Every ``gb_epoch`` training epochs the callback measures, with the model in eval mode, the loss of every
head (each unimodal head and the fused head) on training data and on held-out data, and sets the
model's blend weights from the change since the previous measurement (`blend_weights_from_losses`). The
first measurement is taken when training starts, so the first estimate covers epochs 1..gb_epoch.

Held-out data: the datamodule's **validation split** (the paper and MultiBench hold out part of the
training set instead, MultiBench 8%). The same split then also selects the checkpoint, so the blend
weights see the data used for model selection; the test split is never touched. Training losses are
measured on at most ``max_batches`` batches of the (shuffled) training loader, held-out losses on at most
``max_batches`` validation batches (None: all). Under DDP the per-rank sums are added across ranks, so
every rank sets the same weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytorch_lightning as pl
import torch

from fusionbench.errors import ConfigError
from fusionbench.fusion.gradient_blend.model import FORMS, GradientBlendFusion, blend_weights_from_losses


class GradientBlendCallback(pl.Callback):
    """Args:
    gb_epoch: epochs between weight estimates (MultiBench AV-MNIST: 10).
    form: ``delta`` (the paper's ΔG/ΔO²) or ``multibench`` (L^V/O², MultiBench's default).
    min_overfit: floor of |ΔO| (or O) in the denominator (MultiBench: 1e-4).
    max_batches: batches of each loader used per measurement (None: all).
    """

    def __init__(
        self,
        gb_epoch: int = 10,
        form: str = "delta",
        min_overfit: float = 1e-4,
        max_batches: int | None = None,
    ) -> None:
        if gb_epoch < 1:
            raise ConfigError(f"callbacks.gradient_blend.gb_epoch must be >= 1, got {gb_epoch}.")
        if form not in FORMS:
            raise ConfigError(f"callbacks.gradient_blend.form must be one of {FORMS}, got {form!r}.")
        if max_batches is not None and max_batches < 1:
            raise ConfigError(
                f"callbacks.gradient_blend.max_batches must be >= 1 or null, got {max_batches}."
            )
        self.gb_epoch, self.form, self.min_overfit, self.max_batches = (
            int(gb_epoch),
            form,
            float(min_overfit),
            max_batches,
        )
        self.snapshot: dict[str, tuple[float, float]] | None = None

    @staticmethod
    def blend_model(pl_module: pl.LightningModule) -> GradientBlendFusion | None:
        """The model's `GradientBlendFusion`; None without one (the callback is in every run and then does
        nothing)."""
        found = [m for m in pl_module.modules() if isinstance(m, GradientBlendFusion)]
        if len(found) > 1:
            raise ConfigError(
                "The gradient-blending callback drives one GradientBlendFusion; this model holds "
                f"{len(found)}. Set callbacks.gradient_blend=null and blend the weights yourself."
            )
        return found[0] if found else None

    def _head_loss_sums(
        self, pl_module: pl.LightningModule, gb: GradientBlendFusion, loader: Iterable
    ) -> torch.Tensor:
        """Per-head loss sums followed by the sample count, as one tensor (summable across ranks)."""
        sums = torch.zeros(len(gb.heads) + 1, device=pl_module.device, dtype=torch.float64)
        for k, batch in enumerate(loader):
            if self.max_batches is not None and k >= self.max_batches:
                break
            inputs = {m: x.to(pl_module.device) for m, x in batch["inputs"].items()}
            target = batch["target"].to(pl_module.device)
            losses = gb.head_losses(pl_module(inputs), target)
            n = target.shape[0]
            sums[:-1] += torch.stack([losses[h].double() * n for h in gb.heads])
            sums[-1] += n
        return sums

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, tuple[float, float]]:
        """``{head: (train_loss, heldout_loss)}`` of the current model."""
        dm = trainer.datamodule
        if dm is None:
            raise ConfigError(
                "The gradient-blending callback reads the train and validation loaders of a datamodule; fit "
                "with one."
            )
        gb = self.blend_model(pl_module)
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                split = [
                    self._head_loss_sums(pl_module, gb, loader())
                    for loader in (dm.train_dataloader, dm.val_dataloader)
                ]
        finally:
            pl_module.train(was_training)
        split = [trainer.strategy.reduce(s, reduce_op="sum") for s in split]
        means = [s[:-1] / s[-1].clamp_min(1) for s in split]
        return {h: (float(means[0][i]), float(means[1][i])) for i, h in enumerate(gb.heads)}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.blend_model(pl_module) is None:
            return
        if self.form == "delta" and self.snapshot is None:
            self.snapshot = self.measure(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.gb_epoch or self.blend_model(pl_module) is None:
            return
        now = self.measure(trainer, pl_module)
        weights = blend_weights_from_losses(self.snapshot, now, self.form, self.min_overfit)
        if weights is not None:  # no head improved: keep the current weights
            self.blend_model(pl_module).set_blend_weights(weights)
        self.snapshot = now
        for head, (train_loss, val_loss) in now.items():
            pl_module.log(f"gb/train_loss_{head}", train_loss, on_step=False, on_epoch=True)
            pl_module.log(f"gb/heldout_loss_{head}", val_loss, on_step=False, on_epoch=True)

    def state_dict(self) -> dict[str, Any]:
        return {"snapshot": self.snapshot}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.snapshot = state_dict.get("snapshot")
