"""Training-step time and peak memory of late fusion, DEQ fusion and weight-tied unrolled fusion at the
shapes of the DEQ paper's benchmarks.

    python scripts/bench_fusion.py                       # CPU, all shapes, all methods
    python scripts/bench_fusion.py --device cuda --steps 20 --out results/deq_bench_gpu.md
    python scripts/bench_fusion.py --shapes brca mosi --f-max-iter 105 --methods late deq_fixed

A step is forward + backward + optimiser update on random features (the fusion module and its head
only: encoders are excluded, since they are the same for every method). Methods: ``late`` (concatenation),
``deq`` (the eager reference: torchdeq Anderson with early stopping, implicit gradient with its checked
backward solve), ``deq_fixed`` (exactly ``--f-max-iter`` forward and ``--f-max-iter + 1`` backward Anderson
steps with no host synchronisation inside the loops, implicit gradient), ``deq_graph`` (the same solves
replayed from CUDA graphs; CUDA only), ``deq_phantom`` (fixed forward iterations, phantom gradient),
``deq_phantom_graph`` (its forward solve from a CUDA graph; CUDA only) and ``unrolled`` (``--depth``
weight-tied layers, backprop through all). It prints milliseconds per step (median over ``--steps`` after
``--warmup``), the ratio to late fusion, peak memory (CUDA: the allocator's peak; CPU: not measured), the
solver's mean forward steps, the final relative residual and the share of backward solves that passed their
check; ``--out`` also writes the table as markdown.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import traceback
from pathlib import Path

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


METHODS = ("late", "deq", "deq_fixed", "deq_graph", "deq_phantom", "deq_phantom_graph", "unrolled")
CUDA_ONLY = ("deq_graph", "deq_phantom_graph")


def build(method: str, n: int, d: int, classes: int, args) -> nn.Module:
    enc = nn.ModuleDict({f"m{i}": IdentityEncoder(d) for i in range(n)})
    if method == "late":
        return ConcatFusion(enc, classes)
    common = dict(
        f_max_iter=args.f_max_iter,
        b_max_iter=args.f_max_iter + 1,
        jac_weight=args.jac_weight,
        max_failures=10**9,
    )
    variants = {
        "deq": {},
        "deq_fixed": {"fixed_iterations": True},
        "deq_graph": {"fixed_iterations": True, "cuda_graph": True},
        "deq_phantom": {"fixed_iterations": True, "grad": "phantom"},
        "deq_phantom_graph": {"fixed_iterations": True, "grad": "phantom", "cuda_graph": True},
        "unrolled": {"mode": "unrolled", "depth": args.depth},
    }
    return DEQFusion(enc, classes, **common, **variants[method])


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
    backward = model.backward_stats.summary() if isinstance(model, DEQFusion) else {}
    return {
        "ms": 1000 * statistics.median(times),
        "peak_mib": peak,
        "nstep": float(info.get("deq/nstep", float("nan"))),
        "residual": float(info.get("deq/rel_residual", float("nan"))),
        "b_converged": backward.get("converged", float("nan")),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--f-max-iter", type=int, default=30)
    p.add_argument("--depth", type=int, default=30, help="layers of the weight-tied unrolled baseline")
    p.add_argument("--jac-weight", type=float, default=0.0)
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--out", help="also write the table as markdown to this file")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(
            f"--device {args.device}: no CUDA device is visible here; run on a GPU machine "
            "or use --device cpu."
        )
    logging.getLogger("fusionbench").setLevel(logging.ERROR)
    head = (
        f"device={args.device} "
        f"({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}), "
        f"f_max_iter={args.f_max_iter}, depth={args.depth}, jac_weight={args.jac_weight}, "
        f"threads={torch.get_num_threads()}, torch {torch.__version__}"
    )
    cols = ["shape", "method", "ms/step", "x late", "peak MiB", "fwd steps", "rel residual", "bwd converged"]
    print(head)
    print(
        f"{cols[0]:8} {cols[1]:12} {cols[2]:>9} {cols[3]:>7} {cols[4]:>9} {cols[5]:>9} {cols[6]:>12} "
        f"{cols[7]:>13}"
    )
    rows = []
    for shape in args.shapes:
        base = None
        for method in args.methods:
            if method in CUDA_ONLY and not args.device.startswith("cuda"):
                continue
            try:
                r = bench(method, shape, args)
            except (
                Exception
            ) as e:  # one failing method (say, a CUDA graph that cannot be captured) must not lose the table
                traceback.print_exc()
                rows.append([shape, method, f"failed: {type(e).__name__}"] + [""] * (len(cols) - 3))
                print(f"{shape:8} {method:12} failed: {e!r}"[:300])
                continue
            base = base or r["ms"]
            row = [
                shape,
                method,
                f"{r['ms']:.1f}",
                f"{r['ms'] / base:.1f}",
                f"{r['peak_mib']:.1f}",
                f"{r['nstep']:.1f}",
                f"{r['residual']:.2e}",
                f"{r['b_converged']:.2f}",
            ]
            rows.append(row)
            print(
                f"{row[0]:8} {row[1]:12} {row[2]:>9} {row[3]:>7} {row[4]:>9} {row[5]:>9} {row[6]:>12} "
                f"{row[7]:>13}"
            )
    if args.out:
        lines = [
            f"Measured by `python scripts/bench_fusion.py {' '.join(sys.argv[1:])}`: {head}.",
            "",
            "| " + " | ".join(cols) + " |",
            "|" + "---|" * 2 + "---:|" * (len(cols) - 2),
        ]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
