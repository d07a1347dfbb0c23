"""Training-step time of CM-BERT + DEQ fusion against CM-BERT alone (DEQ paper Table 3's model), at the
recipe's batch of 24 and 50 word pieces.

    python scripts/bench_cmbert.py                                   # CPU, bert-base sized, random weights
    python scripts/bench_cmbert.py --device cuda --out results/cmbert_deq_speed_gpu.md
    python scripts/bench_cmbert.py --pretrained pretrained/bert-base-uncased   # a saved model instead

A step is forward + backward + AdamW update of the whole model (BERT, the fusion, the head) on random tokens
and audio, with the recipe's settings (configs/experiment/deq_mosi.yaml: Anderson 105 / 106 iterations,
Jacobian term at every step). Without ``--pretrained`` the text model is a randomly initialised
bert-base-uncased (12 layers, 768 wide, 12 heads): the same arithmetic as the real weights, though the DEQ
solver's iteration counts depend on the weights. Printed per model: milliseconds per step (median over
``--steps`` after ``--warmup``), the ratio to CM-BERT, the forward solver's mean steps and the share of
backward solves that passed their check; ``--out`` writes the table as markdown.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from fusionbench.encoders import PretrainedTextEncoder, SequenceIdentityEncoder
from fusionbench.fusion import CMBERTDEQFusion, CMBERTFusion

BERT_BASE = dict(
    model_type="bert",
    vocab_size=30522,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    max_position_embeddings=512,
)


def build(kind: str, args: argparse.Namespace) -> nn.Module:
    text = (
        PretrainedTextEncoder(pretrained=args.pretrained, output="sequence", freeze_embeddings=True)
        if args.pretrained
        else PretrainedTextEncoder(config=BERT_BASE, output="sequence", freeze_embeddings=True)
    )
    encoders = nn.ModuleDict({"audio": SequenceIdentityEncoder(5), "text": text})
    if kind == "cmbert":
        return CMBERTFusion(encoders, 1)
    return CMBERTDEQFusion(encoders, 1, seq_len=args.seq_len, max_failures=10**9)


def batch(args: argparse.Namespace, device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    b, length = args.batch, args.seq_len
    lengths = torch.randint(length // 3, length + 1, (b,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = torch.randint(1000, 30000, (b, length), generator=g) * mask
    inputs = {
        "text": torch.stack([ids, mask], 1),
        "audio": torch.randn(b, length, 5, generator=g) * mask[..., None],
    }
    return {k: v.to(device) for k, v in inputs.items()}, torch.randn(b, 1, generator=g).to(device)


def time_steps(kind: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    model = build(kind, args).to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5)
    inputs, target = batch(args, device)
    times, nsteps = [], []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model(inputs)
        loss = (out.logits - target).pow(2).mean() + (out.aux_loss if out.aux_loss is not None else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append((time.perf_counter() - start) * 1000)
            if "deq/nstep" in out.info:
                nsteps.append(float(out.info["deq/nstep"]))
    row = {"ms": statistics.median(times)}
    if nsteps:
        row["nstep"] = statistics.mean(nsteps)
        summary = model.backward_stats.summary()
        row["b_ok"] = summary.get("converged", float("nan"))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--seq-len", type=int, default=50)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--pretrained", default=None, help="a saved model folder (default: random bert-base)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="markdown file for the table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = {kind: time_steps(kind, args, device) for kind in ("cmbert", "cmbert_deq")}
    where = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'CPU'}"
    )
    weights = f"weights {args.pretrained}" if args.pretrained else "random bert-base"
    lines = [
        f"CM-BERT vs CM-BERT + DEQ fusion, one training step (forward, backward, AdamW), batch {args.batch}, "
        f"{args.seq_len} word pieces, {weights}; "
        f"{device.type} ({where}, {torch.get_num_threads()} threads), median of {args.steps} steps after "
        f"{args.warmup}. Command: `python scripts/bench_cmbert.py --device {args.device}"
        f"{' --threads ' + str(args.threads) if args.threads else ''}`.",
        "",
        "| model | ms / step | x CM-BERT | solver steps (forward, mean) | backward solves passing check |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    base = rows["cmbert"]["ms"]
    for kind, row in rows.items():
        steps = f"{row['nstep']:.1f}" if "nstep" in row else "-"
        b_ok = f"{100 * row['b_ok']:.0f}%" if "b_ok" in row else "-"
        lines.append(f"| {kind} | {row['ms']:.0f} | {row['ms'] / base:.2f} | {steps} | {b_ok} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
