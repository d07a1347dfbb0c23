"""Training-step time and peak memory of late fusion, DEQ fusion (implicit) and weight-tied unrolled
fusion at the shapes of the DEQ paper's benchmarks.

    python scripts/bench_fusion.py                       # CPU, all shapes
    python scripts/bench_fusion.py --device cuda --steps 20
    python scripts/bench_fusion.py --shapes brca mosi --f-max-iter 105

A step is forward + backward + optimiser update on random features (the fusion module and its head
only: encoders are excluded, since they are the same for every method). It prints milliseconds per
step (median over ``--steps`` after ``--warmup``), the ratio to late fusion, peak memory (CUDA: the
allocator's peak; CPU: not measured), the solver's mean steps and final relative residual.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
from torch import nn

from fusionbench.encoders import IdentityEncoder
from fusionbench.fusion import ConcatFusion, DEQFusion

SHAPES = {  # name: (modalities, width, batch)
    "brca": (3, 500, 612),
    "mmimdb": (2, 512, 256),
    "mosi": (2, 768, 24),
    "vqa": (2, 1024, 512),
}


def build(method: str, n: int, d: int, classes: int, args) -> nn.Module:
    enc = nn.ModuleDict({f"m{i}": IdentityEncoder(d) for i in range(n)})
    if method == "late":
        return ConcatFusion(enc, classes)
    common = dict(f_max_iter=args.f_max_iter, b_max_iter=args.f_max_iter + 1, jac_weight=args.jac_weight, max_failures=10**9)
    if method == "deq":
        return DEQFusion(enc, classes, **common)
    return DEQFusion(enc, classes, mode="unrolled", unroll_steps=args.unroll_steps, **common)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(method: str, shape: str, args) -> dict:
    n, d, batch = SHAPES[shape]
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build(method, n, d, 10, args).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = {f"m{i}": torch.randn(batch, d, device=device) for i in range(n)}
    y = torch.randint(0, 10, (batch,), device=device)
    times, info = [], {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        out = model(x)
        loss = nn.functional.cross_entropy(out.logits, y)
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            info = out.info
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return {
        "ms": 1000 * statistics.median(times),
        "peak_mib": peak,
        "nstep": float(info.get("deq/nstep", float("nan"))),
        "residual": float(info.get("deq/rel_residual", float("nan"))),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--f-max-iter", type=int, default=30)
    p.add_argument("--unroll-steps", type=int, default=30)
    p.add_argument("--jac-weight", type=float, default=0.0)
    args = p.parse_args()
    logging.getLogger("fusionbench").setLevel(logging.ERROR)
    print(f"device={args.device} f_max_iter={args.f_max_iter} unroll_steps={args.unroll_steps} jac_weight={args.jac_weight} threads={torch.get_num_threads()}")
    print(f"{'shape':8} {'method':9} {'ms/step':>9} {'x late':>7} {'peak MiB':>9} {'steps':>6} {'rel res':>9}")
    for shape in args.shapes:
        base = None
        for method in ("late", "deq", "unrolled"):
            r = bench(method, shape, args)
            base = base or r["ms"]
            print(f"{shape:8} {method:9} {r['ms']:9.1f} {r['ms'] / base:7.1f} {r['peak_mib']:9.1f} {r['nstep']:6.1f} {r['residual']:9.2e}")


if __name__ == "__main__":
    main()
