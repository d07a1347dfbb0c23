"""torchmetrics collections chosen by the dataset's ``task_type``.

| task | metrics (key) |
| --- | --- |
| multiclass | accuracy ``acc``, weighted F1 ``f1_weighted``, macro F1 ``f1_macro``, macro AUROC ``auroc`` |
| multilabel | micro F1 (``f1_micro``), macro F1 (``f1_macro``) at threshold 0.5 on sigmoid outputs |
| regression | ``mse``, ``mae``, Pearson r (``pearson``) |

Datasets may add extras (their ``extra_metrics``): ``acc2_has0`` = binary accuracy of the sign,
``(pred >= 0) == (target >= 0)`` over all samples (DynMM's and CM-BERT's "Acc-2"), and ``acc2_non0`` =
the same over samples whose target is not 0, comparing ``> 0`` (MultiBench's default).

For two classes the macro one-vs-rest AUROC equals the usual binary AUROC.
"""

from __future__ import annotations

import torch
import torchmetrics as tm
from torchmetrics import MetricCollection


class SignAccuracy(tm.Metric):
    """Binary accuracy of the sign of a sentiment score (module docstring: ``has0`` / ``non0``)."""

    full_state_update = False

    def __init__(self, zeros: str = "has0") -> None:
        super().__init__()
        if zeros not in ("has0", "non0"):
            raise ValueError(f"zeros must be 'has0' or 'non0', got {zeros!r}")
        self.zeros = zeros
        self.add_state("correct", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        preds, target = preds.reshape(-1), target.reshape(-1)
        if self.zeros == "has0":
            hit = (preds >= 0) == (target >= 0)
        else:
            keep = target != 0
            hit = (preds[keep] > 0) == (target[keep] > 0)
        self.correct += hit.sum()
        self.total += hit.numel()

    def compute(self) -> torch.Tensor:
        return self.correct / self.total.clamp(min=1)


EXTRAS = {"acc2_has0": lambda: SignAccuracy("has0"), "acc2_non0": lambda: SignAccuracy("non0")}


def make_metrics(
    task_type: str, num_outputs: int, extra: tuple[str, ...] | list[str] = ()
) -> MetricCollection:
    unknown = [e for e in extra if e not in EXTRAS]
    if unknown:
        raise ValueError(f"unknown extra metrics {unknown}; known: {sorted(EXTRAS)}")
    collection = _base_metrics(task_type, num_outputs)
    if extra:
        collection.add_metrics({e: EXTRAS[e]() for e in extra})
    return collection


def _base_metrics(task_type: str, num_outputs: int) -> MetricCollection:
    if task_type == "multiclass":
        k = num_outputs
        return MetricCollection(
            {
                "acc": tm.classification.MulticlassAccuracy(k, average="micro"),
                "f1_weighted": tm.classification.MulticlassF1Score(k, average="weighted"),
                "f1_macro": tm.classification.MulticlassF1Score(k, average="macro"),
                "auroc": tm.classification.MulticlassAUROC(k, average="macro"),
            }
        )
    if task_type == "multilabel":
        k = num_outputs
        return MetricCollection(
            {
                "f1_micro": tm.classification.MultilabelF1Score(k, average="micro", threshold=0.5),
                "f1_macro": tm.classification.MultilabelF1Score(k, average="macro", threshold=0.5),
            }
        )
    if task_type == "regression":
        return MetricCollection(
            {
                "mse": tm.MeanSquaredError(),
                "mae": tm.MeanAbsoluteError(),
                "pearson": tm.PearsonCorrCoef(num_outputs),
            }
        )
    raise ValueError(f"unknown task_type {task_type!r}")


def prepare_for_metrics(
    task_type: str, logits: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn model outputs into what the collection expects (probabilities, integer labels, ...)."""
    if task_type == "multiclass":
        return logits.softmax(-1), target.long()
    if task_type == "multilabel":
        return logits.sigmoid(), target.long()
    if logits.shape[-1] == 1:
        return logits.squeeze(-1), target.reshape(-1).float()
    return logits, target.float()
