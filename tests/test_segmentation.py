"""Segmentation task: the confusion-matrix metrics against a hand-worked matrix, upsampling before the
argmax, the weighted loss with void ignored and the multi-scale side losses by hand, and FusionTask
training, validating, predicting and checkpoint loading on a tiny RGB-D conv model."""

from __future__ import annotations

import math
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from fusionbench.data.base import TensorDictDataset
from fusionbench.errors import TrainingError
from fusionbench.fusion.base import FusionOutput
from fusionbench.metrics import make_metrics, per_class_iou, prepare_for_metrics
from fusionbench.metrics.segmentation import SegmentationMetric, confusion_matrix
from fusionbench.task import FusionTask, segmentation_loss, side_outputs_loss, task_loss

# Two 2x4 label maps (void -1) and predictions over C = 4 classes: class 2 is predicted but never labelled,
# class 3 occurs nowhere outside void pixels (its prediction at a void pixel must not count).
TARGET = torch.tensor([[[0, 0, 1, -1], [1, 1, -1, 0]], [[1, 1, 1, 1], [0, -1, -1, -1]]])
PREDS = torch.tensor([[[0, 1, 1, 3], [1, 0, 2, 2]], [[1, 1, 2, 1], [0, 0, 0, 0]]])
# rows = true class, columns = predicted, worked out pixel by pixel from the maps above
CONFMAT = torch.tensor([[2, 1, 1, 0], [1, 5, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]])


def seg_metrics(preds: torch.Tensor, target: torch.Tensor, c: int = 4) -> dict[str, float]:
    metrics = make_metrics("segmentation", c)
    metrics.update(preds, target)
    return {k: float(v) for k, v in metrics.compute().items()}


def test_confusion_matrix_by_hand_skips_void_pixels():
    assert torch.equal(confusion_matrix(PREDS, TARGET, 4), CONFMAT)


def test_miou_pixel_accuracy_and_mean_class_accuracy_by_hand():
    m = seg_metrics(PREDS, TARGET)
    # IoU: c0 2/(4+3-2) = 0.4, c1 5/(7+6-5) = 0.625, c2 0/(0+2-0) = 0, c3 empty union -> 0 (counted)
    assert m["miou"] == pytest.approx((0.4 + 0.625 + 0.0 + 0.0) / 4)
    assert m["pixel_acc"] == pytest.approx(7 / 11)  # 11 non-void pixels, 7 on the diagonal
    assert m["macc"] == pytest.approx((2 / 4 + 5 / 7) / 2)  # recall of the labelled classes 0 and 1 only
    assert per_class_iou(CONFMAT).tolist() == pytest.approx([0.4, 0.625, 0.0, 0.0])


def test_accumulating_batches_and_merging_states_equal_one_big_update():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(-1, 5, (6, 7, 9), generator=g)
    preds = torch.randint(0, 5, (6, 7, 9), generator=g)
    whole = seg_metrics(preds, target, 5)
    parts = make_metrics("segmentation", 5)
    for sl in (slice(0, 1), slice(1, 4), slice(4, 6)):
        parts.update(preds[sl], target[sl])
    assert {k: float(v) for k, v in parts.compute().items()} == pytest.approx(whole)
    # what DDP does with the state (dist_reduce_fx="sum"): two ranks' matrices merged
    a, b = SegmentationMetric(5, "miou"), SegmentationMetric(5, "miou")
    a.update(preds[:2], target[:2])
    b.update(preds[2:], target[2:])
    a.merge_state(b)
    assert float(a.compute()) == pytest.approx(whole["miou"])


def test_logits_are_upsampled_to_the_label_size_before_the_argmax():
    # two low-res pixels; bilinear upsampling 2 -> 3 (align_corners=False) makes the middle pixel their mean
    # [0.5, 0.5, 0.6]: class 2, which neither pixel's own argmax picks (argmax first, then nearest: [0, 0, 1])
    logits = torch.tensor([[1.0, 0.0, 0.6], [0.0, 1.0, 0.6]]).T.reshape(1, 3, 1, 2)
    target = torch.tensor([[[0, 2, 1]]])
    preds, labels = prepare_for_metrics("segmentation", logits, target)
    assert preds.tolist() == [[[0, 2, 1]]] and torch.equal(labels, target)
    m = make_metrics("segmentation", 3)
    m.update(preds, labels)
    assert float(m.compute()["pixel_acc"]) == 1.0


def test_out_of_range_labels_are_refused():
    with pytest.raises(ValueError, match="void = -1"):
        confusion_matrix(torch.zeros(1, 2, 2), torch.full((1, 2, 2), 4), 4)


def test_weighted_loss_with_void_by_hand():
    # three pixels: class 0 with uniform logits (-log 1/3), void, class 2 with softmax 1/2 (-log 1/2)
    logits = torch.tensor([[0.0, 0.0, 0.0], [9.0, -9.0, 3.0], [0.0, 0.0, math.log(2.0)]]).T.reshape(
        1, 3, 1, 3
    )
    target = torch.tensor([[[0, -1, 2]]])
    w = torch.tensor([1.0, 2.0, 3.0])
    expected = (1 * math.log(3) + 3 * math.log(2)) / (1 + 3)  # ESANet: sum(w * loss) / sum(w of non-void)
    assert float(task_loss("segmentation", logits, target, class_weights=w)) == pytest.approx(expected)
    assert float(task_loss("segmentation", logits, target)) == pytest.approx((math.log(3) + math.log(2)) / 2)


def test_main_logits_are_upsampled_and_side_targets_downsampled_nearest():
    g = torch.Generator().manual_seed(1)
    target = torch.randint(-1, 3, (2, 8, 8), generator=g)
    w = torch.tensor([0.5, 1.0, 2.0])
    small = torch.randn(2, 3, 4, 4, generator=g)
    up = F.interpolate(small, size=(8, 8), mode="bilinear", align_corners=False)
    assert float(segmentation_loss(small, target, w)) == pytest.approx(
        float(segmentation_loss(up, target, w))
    )
    sides = [torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 2, 2, generator=g)]
    # nearest 8 -> 4 takes every 2nd pixel from the first, 8 -> 2 every 4th: void stays void
    expected = segmentation_loss(sides[0], target[:, ::2, ::2], w) + segmentation_loss(
        sides[1], target[:, ::4, ::4], w
    )
    assert float(side_outputs_loss(sides, target, w)) == pytest.approx(float(expected))


# -- FusionTask on a tiny RGB-D model ---------------------------------------------------------------


class TinyRGBD(nn.Module):
    """A 1x1 conv over concatenated RGB and depth; in training also side outputs at /2 and /4."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, classes, 1)

    def forward(self, inputs):
        logits = self.conv(torch.cat([inputs["rgb"], inputs["depth"]], 1))
        extras = (
            {"side_logits": [F.avg_pool2d(logits, 2), F.avg_pool2d(logits, 4)]} if self.training else None
        )
        return FusionOutput(logits, None, {}, extras)


def rgbd_set(n: int = 8, size: int = 8, classes: int = 3, seed: int = 0) -> TensorDictDataset:
    g = torch.Generator().manual_seed(seed)
    rgb, depth = torch.randn(n, 3, size, size, generator=g), torch.randn(n, 1, size, size, generator=g)
    target = torch.randint(-1, classes, (n, size, size), generator=g)
    return TensorDictDataset({"depth": depth, "rgb": rgb}, target)


def make_task(weights=(0.5, 1.0, 2.0)) -> FusionTask:
    return FusionTask(TinyRGBD(), "segmentation", 3, partial(torch.optim.SGD, lr=0.1), class_weights=weights)


def test_training_step_adds_the_side_losses_and_gradients_reach_the_model():
    task = make_task()
    batch = next(iter(DataLoader(rgbd_set(), batch_size=4)))
    with pytest.warns(UserWarning, match="self.trainer"):  # no Trainer: the step logs nothing, still computes
        total = task.training_step(batch, 0)
    out = task.model(batch["inputs"])
    w = torch.tensor([0.5, 1.0, 2.0])
    expected = segmentation_loss(out.logits, batch["target"], w) + side_outputs_loss(
        out.extras["side_logits"], batch["target"], w
    )
    assert torch.isfinite(total) and float(total.detach()) == pytest.approx(float(expected.detach()))
    total.backward()
    assert task.model.conv.weight.grad is not None and task.model.conv.weight.grad.abs().sum() > 0


def test_class_weights_are_checked_and_a_buffer_that_old_checkpoints_need_not_hold():
    with pytest.raises(TrainingError, match="one weight per class"):
        make_task(weights=(1.0, 2.0))
    with pytest.raises(TrainingError, match="segmentation setting"):
        FusionTask(
            nn.Linear(2, 3), "multiclass", 3, partial(torch.optim.SGD, lr=0.1), class_weights=[1, 1, 1]
        )
    task = make_task()
    assert "class_weights" in task.state_dict() and task.class_weights.tolist() == [0.5, 1.0, 2.0]
    old = {k: v for k, v in task.state_dict().items() if k != "class_weights"}  # a checkpoint from before
    again = make_task(weights=(3.0, 2.0, 1.0))
    again.load_state_dict(old)  # strict: loads, keeps its own weights
    assert again.class_weights.tolist() == [3.0, 2.0, 1.0]
    bare = make_task(weights=None)
    bare.load_state_dict(task.state_dict())  # a task built without weights takes the checkpoint's
    assert bare.class_weights.tolist() == [0.5, 1.0, 2.0]
    logits, target = torch.randn(1, 3, 2, 2), torch.tensor([[[0, 1], [2, -1]]])
    assert float(
        task_loss("segmentation", logits, target, class_weights=bare.class_weights)
    ) == pytest.approx(
        float(F.cross_entropy(logits, target, weight=torch.tensor([0.5, 1.0, 2.0]), ignore_index=-1))
    )


def test_fit_validate_and_predict_with_segmentation_batches(tmp_path):
    task = make_task()
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    train, val = DataLoader(rgbd_set(), batch_size=4), DataLoader(rgbd_set(seed=1), batch_size=4)
    trainer.fit(task, train, val)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert {"train/loss", "train/side_loss", "train/miou", "val/loss", "val/miou", "val/pixel_acc"} <= set(
        logged
    )
    assert "val/side_loss" not in logged  # eval mode: no side outputs
    assert all(math.isfinite(v) for v in logged.values())
    preds = trainer.predict(task, DataLoader(rgbd_set(seed=2), batch_size=4))
    assert preds[0]["index"].shape == (4, 8, 8)
