"""Linear probes of unimodal representations over Pro-Fusion's unroll steps (Pro-Fusion Figure 13).

For a trained model, the output of every encoder (the input of the fusion layer) is collected at each
unroll step t = 1..R on training and test samples; a multinomial logistic regression is fitted per
(modality, step) on the training features and scored on the test features. Rising accuracy over t means
the unimodal representation takes in information from the other modalities through the feedback.
A base model (no unroll steps) has one step, its encoders' outputs: the reference for a Pro model's step 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F

from fusionbench.errors import ConfigError


def _unroll(model, steps: int) -> Callable[[Mapping], list]:
    """The model's steps 1..``steps`` on a batch of inputs; a base model has only step 1."""
    if hasattr(model, "unroll"):
        return lambda inputs: model.unroll(inputs, steps)
    if not hasattr(model, "step"):
        raise ConfigError(
            f"Linear probes need a model with encoders and a fusion step; got {type(model).__name__}."
        )
    if steps != 1:
        raise ConfigError(
            f"{type(model).__name__} is a base model with one step (no unroll steps); probe it with steps=1, "
            f"not {steps}."
        )
    return lambda inputs: [model.step(inputs, None)]


@torch.no_grad()
def unrolled_embeddings(
    model, batches: Iterable[Mapping], steps: int, limit: int | None = None
) -> tuple[dict, torch.Tensor]:
    """``({modality: [step-1 features (N, d), ..., step-R features]}, labels (N,))``."""
    unroll = _unroll(model, steps)
    was_training = model.training
    model.eval()
    feats: dict[str, list[list[torch.Tensor]]] = {}
    labels, seen = [], 0
    for batch in batches:
        for t, step in enumerate(unroll(batch["inputs"])):
            for m, h in step.embeddings.items():
                feats.setdefault(m, [[] for _ in range(steps)])[t].append(h.flatten(1).float())
        labels.append(batch["target"])
        seen += len(batch["target"])
        if limit is not None and seen >= limit:
            break
    model.train(was_training)
    out = {m: [torch.cat(chunks)[:limit] for chunks in per_step] for m, per_step in feats.items()}
    return out, torch.cat(labels)[:limit]


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float = 1e-4, max_iter: int = 200
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on standardised features by L-BFGS; returns (W, b, mean, std)."""
    x = x.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, y.long()) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach(), mean, std


def probe_accuracy(
    train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], num_classes: int
) -> float:
    w, b, mean, std = fit_logistic(*train, num_classes)
    x, y = test
    pred = (((x.double() - mean) / std) @ w + b).argmax(1)
    return float((pred == y).double().mean())


def linear_probe(
    model,
    train_batches: Iterable[Mapping],
    test_batches: Iterable[Mapping],
    num_classes: int,
    steps: int | None = None,
    train_limit: int | None = 10000,
) -> dict[str, list[float]]:
    """``{modality: [test accuracy of the probe at step 1, ..., step R]}``, and under ``"all"`` the probe of
    every encoder's output concatenated (the whole input of the fusion layer at that step): whether a unimodal
    probe falls because information left that encoder or because it left the model."""
    steps = int(steps or getattr(model, "unroll_steps", 1))
    tr, y_tr = unrolled_embeddings(model, train_batches, steps, train_limit)
    te, y_te = unrolled_embeddings(model, test_batches, steps)
    if len(tr) > 1:
        for feats in (tr, te):
            feats["all"] = [torch.cat([feats[m][t] for m in sorted(feats)], dim=1) for t in range(steps)]
    return {
        m: [probe_accuracy((tr[m][t], y_tr), (te[m][t], y_te), num_classes) for t in range(steps)]
        for m in sorted(tr)
    }
