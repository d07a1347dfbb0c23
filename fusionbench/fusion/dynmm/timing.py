"""Measured inference time of a DynMM model: hard routing against running every expert.

DynMM's claim is that routing saves computation at inference; `count_madds` counts it, this module
times it. On the first ``samples`` test samples, cut into batches of each size in ``batch_sizes``, it
times (eval mode, no gradients, one CPU/GPU stream, median over ``repeats`` passes after a warm-up):

- ``routed``: `DynMMFusion.forward`, the gate and then each sample's selected expert only;
- ``every_expert``: the gate and every expert on every sample (what soft gating, DynMM-d, or an
  ensemble of the experts costs);
- ``gate`` and each expert alone.

Times are milliseconds per sample (a pass's time / samples). It also checks the model's output against
the experts run separately (``max_abs_diff``): each sample's selected expert with hard decisions, the
gate-weighted mixture with soft gating (``gating: soft``, where ``routed`` runs every expert and the
shares are the mean soft weights). `fusionbench.train` writes the
result to a DynMM run's record as ``dynmm_timing`` (config ``dynmm_timing: {samples, batch_sizes,
repeats}``; ``samples: 0`` turns it off); ``scripts/bench_dynmm.py`` runs it on finished runs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fusionbench.fusion.dynmm.model import DynMMFusion
from fusionbench.fusion.dynmm.routing import take


def find_dynmm(module: nn.Module) -> DynMMFusion | None:
    return next((m for m in module.modules() if isinstance(m, DynMMFusion)), None)


def first_test_inputs(dm, samples: int, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The first ``samples`` test inputs of the datamodule as one batch."""
    parts: list[Mapping[str, torch.Tensor]] = []
    count = 0
    for batch in dm.test_dataloader():
        parts.append(batch["inputs"])
        count += next(iter(batch["inputs"].values())).shape[0]
        if count >= samples:
            break
    inputs = {m: torch.cat([p[m] for p in parts])[:samples] for m in parts[0]}
    return {m: x.to(device) for m, x in inputs.items()} if device is not None else inputs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pass_ms(
    fn: Callable[[Any], Any], chunks: list[Any], n: int, repeats: int, device: torch.device
) -> float:
    times = []
    with torch.no_grad():
        fn(chunks[0])  # warm-up
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            for x in chunks:
                fn(x)
            _sync(device)
            times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times) / n


def time_routing(
    model: DynMMFusion,
    inputs: Mapping[str, torch.Tensor],
    batch_sizes: Sequence[int] = (1,),
    repeats: int = 3,
) -> dict[str, Any]:
    """Milliseconds per sample of routed inference, every expert, the gate and each expert (see the
    module)."""
    was_training = model.training
    model.eval()
    try:
        device = next(iter(inputs.values())).device
        n = next(iter(inputs.values())).shape[0]
        names = list(model.expert_names)
        with torch.no_grad():
            gate_logits = model.gate(inputs)
            output = model(inputs).logits
            every = torch.stack(
                [o.logits for o in model._run_all(inputs).values()], dim=1
            )  # (n, experts, ...)
        if model.gating == "soft":  # every expert runs; the output is the mixture
            g = torch.softmax(gate_logits / float(model.temperature), dim=-1)
            expected = model._mix(g, list(every.unbind(dim=1)))
        else:
            g = torch.nn.functional.one_hot(gate_logits.argmax(dim=-1), len(names)).float()
            expected = every[torch.arange(n, device=device), gate_logits.argmax(dim=-1)]
        out: dict[str, Any] = {
            "samples": n,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "repeats": repeats,
            "gating": model.gating,
            "shares": {name: float(g[:, i].mean()) for i, name in enumerate(names)},
            "max_abs_diff": float((output - expected).abs().max()),
            "ms_per_sample": {},
        }
        for b in batch_sizes:
            chunks = [take(dict(inputs), slice(i, i + int(b))) for i in range(0, n, int(b))]
            ms = {
                "routed": _pass_ms(model, chunks, n, repeats, device),
                "every_expert": _pass_ms(
                    lambda x: (model.gate(x), model._run_all(x)), chunks, n, repeats, device
                ),
                "gate": _pass_ms(model.gate, chunks, n, repeats, device),
            }
            for name in names:
                ms[f"expert_{name}"] = _pass_ms(
                    lambda x, name=name: model.experts[name](model.expert_inputs(x, name)),
                    chunks,
                    n,
                    repeats,
                    device,
                )
            ms["speedup"] = ms["every_expert"] / ms["routed"] if ms["routed"] > 0 else None
            out["ms_per_sample"][str(int(b))] = ms
        return out
    finally:
        model.train(was_training)


__all__ = ["find_dynmm", "first_test_inputs", "time_routing"]
