"""Metric collections and losses against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from fusionbench.metrics import make_metrics, prepare_for_metrics
from fusionbench.task import task_loss


def compute(task_type: str, num_outputs: int, logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    metrics = make_metrics(task_type, num_outputs)
    metrics.update(*prepare_for_metrics(task_type, logits, target))
    return {k: float(v) for k, v in metrics.compute().items()}


def test_multiclass_accuracy_and_f1():
    pred = torch.tensor([0, 1, 1, 2, 2, 0])
    target = torch.tensor([0, 1, 2, 2, 2, 1])
    logits = torch.nn.functional.one_hot(pred, 3).float() * 5
    m = compute("multiclass", 3, logits, target)
    # per class F1: c0 P=1/2 R=1 -> 2/3; c1 P=1/2 R=1/2 -> 1/2; c2 P=1 R=2/3 -> 4/5; supports 1, 2, 3
    assert m["acc"] == pytest.approx(4 / 6)
    assert m["f1_macro"] == pytest.approx((2 / 3 + 1 / 2 + 4 / 5) / 3)
    assert m["f1_weighted"] == pytest.approx((1 * 2 / 3 + 2 * 1 / 2 + 3 * 4 / 5) / 6)


def test_binary_auroc_is_the_pairwise_ranking_probability():
    p = torch.tensor([0.9, 0.8, 0.3, 0.6, 0.2])
    target = torch.tensor([1, 1, 0, 0, 1])
    logits = torch.stack([torch.zeros(5), torch.logit(p)], dim=1)  # softmax -> [1-p, p]
    # positives {0.9, 0.8, 0.2} vs negatives {0.3, 0.6}: 4 of 6 pairs ranked correctly
    assert compute("multiclass", 2, logits, target)["auroc"] == pytest.approx(4 / 6, abs=1e-6)


def test_multilabel_micro_and_macro_f1():
    probs = torch.tensor([[0.9, 0.2], [0.6, 0.7], [0.1, 0.4]])
    target = torch.tensor([[1, 0], [0, 1], [1, 1]])
    m = compute("multilabel", 2, torch.logit(probs), target)
    # label 0: TP1 FP1 FN1 -> 1/2; label 1: TP1 FP0 FN1 -> 2/3; pooled TP2 FP1 FN2 -> 4/7
    assert m["f1_macro"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m["f1_micro"] == pytest.approx(4 / 7)


def test_regression_metrics():
    pred = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    target = torch.tensor([1.0, 3.0, 2.0, 5.0])
    m = compute("regression", 1, pred, target)
    assert m["mse"] == pytest.approx(0.75)
    assert m["mae"] == pytest.approx(0.75)
    # Pearson: x-mean = [-1.5,-.5,.5,1.5], y-mean = [-1.75,.25,-.75,2.25];
    # cross sum 5.5, |x| sqrt(5), |y| sqrt(8.75)
    assert m["pearson"] == pytest.approx(5.5 / math.sqrt(5 * 8.75), abs=1e-6)


def test_losses():
    logits = torch.tensor([[2.0, 0.0]])
    assert float(task_loss("multiclass", logits, torch.tensor([0]))) == pytest.approx(
        math.log(1 + math.exp(-2))
    )
    assert float(task_loss("multilabel", torch.tensor([[0.0]]), torch.tensor([[1]]))) == pytest.approx(
        math.log(2)
    )
    assert float(task_loss("regression", torch.tensor([[3.0]]), torch.tensor([1.0]))) == pytest.approx(4.0)


def test_sign_accuracy_by_hand():
    from fusionbench.metrics.collections import SignAccuracy

    preds, truth = torch.tensor([0.5, -0.2, 0.0, 1.0]), torch.tensor([1.0, 0.0, -1.0, 0.0])
    has0, non0 = SignAccuracy("has0"), SignAccuracy("non0")
    has0.update(preds, truth)
    non0.update(preds, truth)
    # has0: (>=0) agree for 0.5/1 and 1.0/0 only -> 2/4;
    # non0: targets 1 and -1 kept, 0.5>0 ok, 0.0>0 false = (-1>0) false ok
    assert has0.compute().item() == 0.5 and non0.compute().item() == 1.0


def test_extra_metrics_are_opt_in():
    from fusionbench.metrics import make_metrics

    assert set(make_metrics("regression", 1)) == {"mse", "mae", "pearson"}
    assert set(make_metrics("regression", 1, ("acc2_has0",))) == {"mse", "mae", "pearson", "acc2_has0"}
    with pytest.raises(ValueError, match="unknown extra metrics"):
        make_metrics("regression", 1, ("acc7",))
