"""Training and inference time of Pro-Fusion against the number of unroll steps R (Pro-Fusion
Figure 9b), relative to the base model, at AV-MNIST shapes with the MultiBench LeNet encoders.

    python scripts/bench_profusion.py                          # CPU, bases concat and lowrank, R = 1..4
    python scripts/bench_profusion.py --device cuda --batch 40 --out results/pro_fig9b_timing.md

Train step = forward + backward + SGD update; inference = forward in eval mode without gradients.
Both are medians over ``--steps`` after ``--warmup`` on random inputs. "base" is the unwrapped model;
R = 1 is the wrapper around it (the same computation plus nothing), so its ratio shows the wrapper's
own overhead.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from fusionbench.encoders import LeNetEncoder
from fusionbench.fusion import ProFusion
from fusionbench.fusion.profusion import build_base

BASE_ARGS = {
    "concat": {"head_hidden": [100]},
    "lowrank": {"rank": 40, "output_dim": 120, "head_hidden": [100]},
}


def encoders() -> dict[str, nn.Module]:
    return {"image": LeNetEncoder(1, 6, 3), "audio": LeNetEncoder(1, 6, 5)}


def timed(fn, device: torch.device, warmup: int, steps: int) -> float:
    out = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            out.append(time.perf_counter() - t0)
    return 1000 * statistics.median(out)


def bench(model: nn.Module, args) -> tuple[float, float]:
    device = torch.device(args.device)
    model = model.to(device)
    x = {
        "image": torch.rand(args.batch, 1, 28, 28, device=device),
        "audio": torch.rand(args.batch, 1, 112, 112, device=device),
    }
    y = torch.randint(0, 10, (args.batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def train_step() -> None:
        loss = nn.functional.cross_entropy(model(x).logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def infer() -> None:
        with torch.no_grad():
            model(x)

    model.train()
    t_train = timed(train_step, device, args.warmup, args.steps)
    model.eval()
    t_infer = timed(infer, device, args.warmup, args.steps)
    return t_train, t_infer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bases", nargs="*", default=list(BASE_ARGS), choices=list(BASE_ARGS))
    p.add_argument("--unroll", nargs="*", type=int, default=[1, 2, 3, 4])
    p.add_argument("--batch", type=int, default=40)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = p.parse_args()
    lines = [
        f"device={args.device} batch={args.batch} threads={torch.get_num_threads()} steps={args.steps} "
        "(median)",
        "",
        "| base | R | train ms/step | x base | inference ms/batch | x base |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in args.bases:
        torch.manual_seed(0)
        base_train, base_infer = bench(build_base(name, nn.ModuleDict(encoders()), 10, BASE_ARGS[name]), args)
        lines.append(f"| {name} | base | {base_train:.1f} | 1.00 | {base_infer:.1f} | 1.00 |")
        for r in args.unroll:
            torch.manual_seed(0)
            model = ProFusion(
                encoders(), 10, base=name, base_args=BASE_ARGS[name], unroll_steps=r, context_dim=64
            )
            t, i = bench(model, args)
            lines.append(
                f"| {name} | {r} | {t:.1f} | {t / base_train:.2f} | {i:.1f} | {i / base_infer:.2f} |"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
