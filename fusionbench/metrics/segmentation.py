"""Semantic segmentation metrics on one dataset-level confusion matrix (ESANet / DynMM public code).

Every metric accumulates the same ``(C, C)`` matrix ``confmat[true, pred]`` over the whole split (summed
across DDP ranks), so mIoU is the IoU of the pooled pixels, not a mean of per-image values. Void pixels
(target ``-1``) never enter the matrix. Predictions are class indices; `prepare_for_metrics` turns logits
into them by upsampling bilinearly (``align_corners=False``) to the label size *before* the argmax, as the
public evaluation does (``F.interpolate(pred, label size)`` then ``argmax``).

| key | value |
| --- | --- |
| ``miou`` | mean over all C classes of ``TP / (TP + FP + FN + 1e-15)``; an empty union counts 0 |
| ``pixel_acc`` | correct non-void pixels / non-void pixels (``trace / sum``) |
| ``macc`` | mean over the classes present in the labels of their recall ``TP / (TP + FN)`` |

``miou`` follows the public ``miou_pytorch`` exactly (ESANet ``src/confusion_matrix.py``, which DynMM
reuses): a class absent from both labels and predictions lowers the mean (IoU 0), so it is comparable to
the published NYUv2 numbers; `per_class_iou` gives the per-class values for tables.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric, MetricCollection

SEGMENTATION_METRICS = ("miou", "pixel_acc", "macc")


def confusion_matrix(preds: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(C, C)`` int64 counts ``[true, pred]`` of the non-void pixels (target ``-1`` is void)."""
    if preds.shape != target.shape:
        raise ValueError(
            f"Segmentation predictions {tuple(preds.shape)} and labels {tuple(target.shape)} differ in "
            "shape; upsample the logits to the label size before the argmax (`prepare_for_metrics`)."
        )
    target, preds = target.reshape(-1).long(), preds.reshape(-1).long()
    keep = target >= 0
    target, preds = target[keep], preds[keep]
    if bool(((target >= num_classes) | (preds < 0) | (preds >= num_classes)).any()):  # one device sync
        raise ValueError(
            f"Segmentation classes must lie in 0..{num_classes - 1} (void = -1); got labels up to "
            f"{int(target.max())} and predictions in {int(preds.min())}..{int(preds.max())}. Check the "
            "dataset's `num_outputs` and that the label files' void 0 was shifted to -1."
        )
    counts = torch.bincount(target * num_classes + preds, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def per_class_iou(confmat: torch.Tensor) -> torch.Tensor:
    """IoU of every class from a ``[true, pred]`` confusion matrix (float64; empty union -> 0)."""
    cm = confmat.double()
    tp = cm.diag()
    return tp / (cm.sum(1) + cm.sum(0) - tp + 1e-15)


def miou(confmat: torch.Tensor) -> torch.Tensor:
    """Mean IoU over all classes (the public ``miou_pytorch``)."""
    return per_class_iou(confmat).mean()


def pixel_accuracy(confmat: torch.Tensor) -> torch.Tensor:
    """Correct / all non-void pixels (NaN for an empty matrix)."""
    cm = confmat.double()
    return cm.diag().sum() / cm.sum()


def mean_class_accuracy(confmat: torch.Tensor) -> torch.Tensor:
    """Mean recall over the classes that occur in the labels (NaN if none does)."""
    cm = confmat.double()
    support = cm.sum(1)
    present = support > 0
    return (cm.diag()[present] / support[present]).mean()


_REDUCE = {"miou": miou, "pixel_acc": pixel_accuracy, "macc": mean_class_accuracy}


class SegmentationMetric(Metric):
    """One of `SEGMENTATION_METRICS` from a dataset-level confusion matrix.

    ``update(preds, target)``: ``preds`` class indices ``(B, H, W)``, ``target`` labels of the same shape
    with void ``-1``. The ``confmat`` state is summed across processes, so DDP evaluation equals one
    process's. In a `MetricCollection` the three metrics share one matrix (torchmetrics compute groups).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    confmat: torch.Tensor

    def __init__(self, num_classes: int, kind: str = "miou", **kwargs) -> None:
        super().__init__(**kwargs)
        if kind not in _REDUCE:
            raise ValueError(f"unknown segmentation metric {kind!r}; known: {list(SEGMENTATION_METRICS)}")
        self.num_classes, self.kind = int(num_classes), kind
        self.add_state(
            "confmat", torch.zeros(self.num_classes, self.num_classes, dtype=torch.long), dist_reduce_fx="sum"
        )

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.confmat += confusion_matrix(
            preds.to(self.confmat.device), target.to(self.confmat.device), self.num_classes
        )

    def compute(self) -> torch.Tensor:
        return _REDUCE[self.kind](self.confmat).float()


def make_segmentation_metrics(num_classes: int) -> MetricCollection:
    return MetricCollection({k: SegmentationMetric(num_classes, k) for k in SEGMENTATION_METRICS})


def logits_to_labels(logits: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Class indices at ``size``: bilinear upsampling (``align_corners=False``) of ``(B, C, h, w)`` logits,
    then the argmax (upsampling first, as the public code: it gives smoother boundaries than nearest
    upsampling of the argmax)."""
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)
    return logits.argmax(1)


__all__ = [
    "SEGMENTATION_METRICS",
    "SegmentationMetric",
    "confusion_matrix",
    "logits_to_labels",
    "make_segmentation_metrics",
    "mean_class_accuracy",
    "miou",
    "per_class_iou",
    "pixel_accuracy",
]
