"""Sentiment metric variants of CMU-MOSI / CMU-MOSEI, each under its own name (benchmark-specs §4.6): the
papers' code bases binarise a score in -3..3 differently, so "Acc-2" means three things.

| name | samples | binarisation | used by |
| --- | --- | --- | --- |
| ``acc2_non0`` / ``f1w_non0`` | truth != 0 | ``> 0`` | MultiBench default, MMIM "non0", MAG |
| ``acc2_has0`` / ``f1w_has0`` | all | ``>= 0`` | MMIM "acc2", DynMM (MOSEI) |
| ``acc2_all_gt0`` / ``f1w_all_gt0`` | all | ``> 0`` (zero counts as negative) | CM-BERT, DEQ (MOSI) |
| ``acc7`` | all | clip to [-3, 3], round half to even, equal | CM-BERT, DEQ, MMIM |
| ``acc5`` | all | clip to [-2, 2], round half to even, equal | MMIM |
| ``mae_non0`` / ``pearson_non0`` | truth != 0 | (the score itself) | MAG |

``f1w_*`` is the weighted F1 of the two classes on that binarisation (each class's F1 weighted by its share
of the true labels; a class never predicted has F1 0). ``mae`` and ``pearson`` on all samples are the
regression collection's own. Rounding is torch's, half to even (numpy's too): 2.5 -> 2, -0.5 -> -0.
"""

from __future__ import annotations

import torch
import torchmetrics as tm


def _binarise(preds: torch.Tensor, target: torch.Tensor, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    if rule == "non0":
        keep = target != 0
        return preds[keep] > 0, target[keep] > 0
    if rule == "has0":
        return preds >= 0, target >= 0
    return preds > 0, target > 0  # all_gt0


def weighted_f1(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Weighted F1 of boolean predictions (sklearn's ``average="weighted"``, zero_division 0)."""
    total = torch.tensor(0.0)
    for cls in (False, True):
        tp = ((pred == cls) & (true == cls)).sum().float()
        predicted, actual = (pred == cls).sum().float(), (true == cls).sum().float()
        f1 = 2 * tp / (predicted + actual) if predicted + actual > 0 else torch.tensor(0.0)
        total = total + f1 * actual
    return total / max(len(true), 1)


def sentiment_metric(name: str, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The variant ``name`` (module table) of scores ``preds`` against labels ``target``."""
    preds, target = preds.reshape(-1).float(), target.reshape(-1).float()
    kind, _, rule = name.partition("_")
    if kind == "acc2":
        pred, true = _binarise(preds, target, rule)
        return (pred == true).float().mean() if len(true) else torch.tensor(0.0)
    if kind == "f1w":
        return weighted_f1(*_binarise(preds, target, rule))
    if name in ("acc7", "acc5"):
        bound = 3.0 if name == "acc7" else 2.0
        return (preds.clamp(-bound, bound).round() == target.clamp(-bound, bound).round()).float().mean()
    keep = target != 0
    if name == "mae_non0":
        return (preds[keep] - target[keep]).abs().mean()
    if name == "pearson_non0":
        p, t = preds[keep] - preds[keep].mean(), target[keep] - target[keep].mean()
        return (p * t).sum() / (p.norm() * t.norm()).clamp(min=1e-12)
    raise ValueError(f"unknown sentiment metric {name!r}; known: {sorted(SENTIMENT)}")


SENTIMENT = (
    "acc2_non0",
    "acc2_has0",
    "acc2_all_gt0",
    "f1w_non0",
    "f1w_has0",
    "f1w_all_gt0",
    "acc7",
    "acc5",
    "mae_non0",
    "pearson_non0",
)


class SentimentMetric(tm.Metric):
    """One variant of `SENTIMENT` over a whole split (scores and labels are gathered, then computed once, so
    F1 and correlation are exact and DDP ranks are concatenated)."""

    full_state_update = False

    def __init__(self, name: str) -> None:
        super().__init__()
        if name not in SENTIMENT:
            raise ValueError(f"unknown sentiment metric {name!r}; known: {list(SENTIMENT)}")
        self.name = name
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.preds.append(preds.detach().reshape(-1).float())
        self.target.append(target.detach().reshape(-1).float())

    def compute(self) -> torch.Tensor:
        cat = tm.utilities.dim_zero_cat
        return sentiment_metric(self.name, cat(self.preds).cpu(), cat(self.target).cpu())
