"""Training throughput (questions per second) of MCAN and MCAN + DEQ fusion on synthetic inputs at VQA-v2's
real shapes: 100 bottom-up regions x 2,048 features, 14 question tokens, a 20,000-word question vocabulary,
3,129 answers, MCAN's batch of 64.

    python scripts/bench_vqa.py                               # CPU, MCAN-small (large is slow on a CPU)
    python scripts/bench_vqa.py --device cuda --size large --precision bf16 --out results/vqa_speed_gpu.md

A step is forward + backward + Adam update with the task's VQA loss (BCE on soft scores, summed over
answers). Printed per model: milliseconds per step (median over ``--steps`` after ``--warmup``), questions per
second, the ratio to MCAN and (DEQ) the forward solver's mean steps; ``--out`` writes the table as markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from fusionbench.encoders import SequenceIdentityEncoder, TokenIdentityEncoder
from fusionbench.fusion import MCANFusion
from fusionbench.task import task_loss


def build(kind: str, args: argparse.Namespace) -> nn.Module:
    encoders = nn.ModuleDict(
        {"image": SequenceIdentityEncoder(2048), "question": TokenIdentityEncoder(args.vocab)}
    )
    deq = {"fusion_point": "deq", "deq_args": {"max_failures": 10**9}} if kind == "mcan_deq" else {}
    return MCANFusion(encoders, args.answers, size=args.size, **deq)


def batch(args: argparse.Namespace, device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    b = args.batch
    boxes = torch.randint(10, 101, (b,), generator=g)
    image = torch.randn(b, 100, 2048, generator=g).abs() * (
        torch.arange(100)[None, :, None] < boxes[:, None, None]
    )
    words = torch.randint(4, 15, (b,), generator=g)
    question = torch.randint(2, args.vocab, (b, 14), generator=g) * (torch.arange(14)[None] < words[:, None])
    target = (torch.rand(b, args.answers, generator=g) < 2 / args.answers).float() * 0.9
    return {"image": image.to(device), "question": question.to(device)}, target.to(device)


def time_steps(kind: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    model = build(kind, args).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=5e-5, betas=(0.9, 0.98), eps=1e-9)
    inputs, target = batch(args, device)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if args.precision == "bf16"
        else contextlib.nullcontext()
    )
    times, nsteps = [], []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            out = model(inputs)
            loss = task_loss("vqa", out.logits.float(), target)
            if out.aux_loss is not None:
                loss = loss + out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append((time.perf_counter() - start) * 1000)
            if "deq/nstep" in out.info:
                nsteps.append(float(out.info["deq/nstep"]))
    ms = statistics.median(times)
    row = {"ms": ms, "qps": args.batch / ms * 1000}
    if nsteps:
        row["nstep"] = statistics.mean(nsteps)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default="small", choices=["small", "large"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=20000)
    parser.add_argument("--answers", type=int, default=3129)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=None, help="markdown file for the table")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = {kind: time_steps(kind, args, device) for kind in ("mcan", "mcan_deq")}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    lines = [
        f"MCAN-{args.size} vs MCAN-{args.size} + DEQ fusion, one training step (forward, backward, Adam), "
        f"batch {args.batch}, 100 x 2048 regions, 14 tokens, {args.answers} answers, {args.precision}; "
        f"{device.type} ({where}, {torch.get_num_threads()} threads), median of {args.steps} steps after "
        f"{args.warmup}. "
        f"Command: `python scripts/bench_vqa.py --device {args.device} --size {args.size} "
        f"--precision {args.precision} --steps {args.steps} --warmup {args.warmup}`.",
        "",
        "| model | ms / step | questions / s | x MCAN (time) | DEQ solver steps (forward, mean) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    base = rows["mcan"]["ms"]
    for kind, row in rows.items():
        steps = f"{row['nstep']:.1f}" if "nstep" in row else "-"
        lines.append(f"| {kind} | {row['ms']:.0f} | {row['qps']:.1f} | {row['ms'] / base:.2f} | {steps} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
