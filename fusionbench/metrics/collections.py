"""torchmetrics collections chosen by the dataset's ``task_type``.

| task | metrics (key) |
| --- | --- |
| multiclass | accuracy ``acc``, weighted F1 ``f1_weighted``, macro F1 ``f1_macro``, macro AUROC ``auroc`` |
| multilabel | micro F1 (``f1_micro``), macro F1 (``f1_macro``) at threshold 0.5 on sigmoid outputs |
| regression | ``mse``, ``mae``, Pearson r (``pearson``) |
| segmentation | ``miou``, pixel accuracy ``pixel_acc``, mean class accuracy ``macc`` (`.segmentation`) |

Datasets may add extras (their ``extra_metrics``): the sentiment variants of
`fusionbench.metrics.sentiment` (``acc2_non0``, ``acc2_has0``, ``acc2_all_gt0``, their weighted F1s,
``acc7``, ``acc5``, ``mae_non0``, ``pearson_non0``), each under its own name.

For two classes the macro one-vs-rest AUROC equals the usual binary AUROC.
"""

from __future__ import annotations

import torch
import torchmetrics as tm
from torchmetrics import MetricCollection

from fusionbench.metrics.sentiment import SENTIMENT, SentimentMetric

# sentiment variants (fusionbench.metrics.sentiment), each an opt-in extra of a regression dataset
EXTRAS = {name: (lambda n=name: SentimentMetric(n)) for name in SENTIMENT}


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
    if task_type == "vqa":  # VQA accuracy overall and per answer type (fusionbench/metrics/vqa.py)
        from fusionbench.metrics.vqa import make_vqa_metrics

        return make_vqa_metrics()
    if (
        task_type == "segmentation"
    ):  # one shared (C, C) confusion matrix (fusionbench/metrics/segmentation.py)
        from fusionbench.metrics.segmentation import make_segmentation_metrics

        return make_segmentation_metrics(num_outputs)
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
    if task_type == "vqa":  # soft answer scores: accuracy reads target[argmax(logits)]
        return logits, target.float()
    if task_type == "segmentation":  # (B, C, h, w) logits -> class indices at the label size (B, H, W)
        from fusionbench.metrics.segmentation import logits_to_labels

        return logits_to_labels(logits, target.shape[-2:]), target.long()
    if logits.shape[-1] == 1:
        return logits.squeeze(-1), target.reshape(-1).float()
    return logits, target.float()
