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


def sentiment(name: str, preds, truth) -> float:
    from fusionbench.metrics.sentiment import SentimentMetric

    metric = SentimentMetric(name)
    for i in range(0, len(preds), 3):  # in batches, as a loop updates it
        metric.update(torch.tensor(preds[i : i + 3]), torch.tensor(truth[i : i + 3]))
    return float(metric.compute())


# six scores with zeros on both sides (benchmark-specs §4.6)
PREDS = [0.5, -0.2, 0.0, 1.0, 2.5, -1.4]
TRUTH = [1.0, 0.0, -1.0, 0.0, 3.0, -0.6]


def test_binary_accuracy_variants_by_hand():
    # non0: truth 0 dropped -> pairs (0.5,1) (0.0,-1) (2.5,3) (-1.4,-0.6); >0: T/T F/F T/T F/F -> 4/4
    assert sentiment("acc2_non0", PREDS, TRUTH) == 1.0
    # has0: >=0 on all: T/T F/T T/F T/T T/T F/F -> 4/6
    assert sentiment("acc2_has0", PREDS, TRUTH) == pytest.approx(4 / 6)
    # all_gt0: >0 on all, zero is negative: T/T F/F F/F T/F T/T F/F -> 5/6
    assert sentiment("acc2_all_gt0", PREDS, TRUTH) == pytest.approx(5 / 6)


def test_weighted_f1_variants_by_hand():
    assert sentiment("f1w_non0", PREDS, TRUTH) == 1.0  # every kept sample right
    # has0: true [T,T,F,T,T,F] pred [T,F,T,T,T,F]. class T: tp 3, pred 4, true 4 -> F1 6/8; class F: tp 1,
    # pred 2, true 2 -> F1 2/4; weighted by support 4 and 2: (4*0.75 + 2*0.5)/6 = 4/6
    assert sentiment("f1w_has0", PREDS, TRUTH) == pytest.approx(4 / 6)
    # all_gt0: true [T,F,F,F,T,F] pred [T,F,F,T,T,F]. T: tp 2, pred 3, true 2 -> 4/5; F: tp 3, pred 3,
    # true 4 -> 6/7; weighted: (2*0.8 + 4*6/7)/6
    assert sentiment("f1w_all_gt0", PREDS, TRUTH) == pytest.approx((2 * 0.8 + 4 * 6 / 7) / 6)


def test_acc7_and_acc5_round_half_to_even_after_clipping():
    # acc7: clip [-3,3] then round half to even: 0.5->0 (truth 1: no), -0.2->-0 (0: yes), 0->0 (-1: no),
    # 1->1 (0: no), 2.5->2 (3: no), -1.4->-1 (-0.6 -> -1: yes) -> 2/6
    assert sentiment("acc7", PREDS, TRUTH) == pytest.approx(2 / 6)
    # acc5: clip [-2,2] first: 2.5 -> 2 and truth 3 -> 2: now equal -> 3/6
    assert sentiment("acc5", PREDS, TRUTH) == pytest.approx(3 / 6)
    assert sentiment("acc7", [2.5, 3.5, -0.5], [2.0, 3.0, 0.0]) == 1.0  # 2.5->2, 3.5 clipped to 3, -0.5->-0


def test_mae_and_pearson_on_the_nonzero_subset():
    keep = [(p, t) for p, t in zip(PREDS, TRUTH) if t != 0]
    mae = sum(abs(p - t) for p, t in keep) / len(keep)
    assert sentiment("mae_non0", PREDS, TRUTH) == pytest.approx(mae)
    ps, ts = [p for p, _ in keep], [t for _, t in keep]
    mp, mt = sum(ps) / 4, sum(ts) / 4
    cov = sum((p - mp) * (t - mt) for p, t in keep)
    r = cov / math.sqrt(sum((p - mp) ** 2 for p in ps) * sum((t - mt) ** 2 for t in ts))
    assert sentiment("pearson_non0", PREDS, TRUTH) == pytest.approx(r, rel=1e-5)


def test_extra_metrics_are_opt_in():
    from fusionbench.metrics import make_metrics

    assert set(make_metrics("regression", 1)) == {"mse", "mae", "pearson"}
    assert set(make_metrics("regression", 1, ("acc2_has0",))) == {"mse", "mae", "pearson", "acc2_has0"}
    with pytest.raises(ValueError, match="unknown extra metrics"):
        make_metrics("regression", 1, ("acc9",))
