"""Time of one training step and one inference batch of every Pro-Fusion Table 4 model, built from
its experiment config on the real stock snapshot (batch 16, 500 returns per stock), and the estimated
time of a run (steps per epoch x epochs; validation, test and the noise grid not included). Models with
per-stock Transformers (LF-Transformer) are timed twice on the same weights, one encoder after another and
stacked into one batched computation (fusionbench/encoders/stacked.py, the default), interleaved: off, on,
off, on ... so that a change in the machine's load hits both alike.

    python scripts/bench_stocks.py                  # F&B, every model, base and Pro-Fusion
    python scripts/bench_stocks.py --variants base  # base models only (Pro-Fusion R = 2 about doubles the
                                                    # activation memory: LF-Transformer needs > 20 GB on CPU)
    python scripts/bench_stocks.py --sector tech --models eflstm lflstm --device cuda \
        --out results/pro_t4_timing.md

Train step = forward + backward + the experiment's optimiser update; inference = forward in eval mode
without gradients; medians over ``--steps`` after ``--warmup`` on real training batches.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from bench_profusion import timed  # scripts/ is on sys.path when run as `python scripts/bench_stocks.py`

from fusionbench.encoders import TransformerSeqEncoder
from fusionbench.task import task_loss
from fusionbench.train import build

MODELS = ["eflstm", "lflstm", "gb", "lftransf", "mult", "eftransf"]


def compose(experiment: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from fusionbench import ROOT

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose(
            "train", overrides=[f"experiment={experiment}", "paths.output_dir=/tmp/fusionbench_bench"]
        )


def stackable(model: torch.nn.Module) -> list[TransformerSeqEncoder]:
    return [m for m in model.modules() if isinstance(m, TransformerSeqEncoder)]


def bench(experiment: str, args) -> list[dict]:
    cfg = compose(experiment)
    dm, task = build(cfg)
    device = torch.device(args.device)
    model = task.model.to(device)
    batch = next(iter(dm.train_dataloader()))
    x = {m: v.to(device) for m, v in batch["inputs"].items()}
    y = batch["target"].to(device)
    opt = task.optimizer_factory(params=model.parameters())

    def train_step() -> None:
        model.train()
        out = model(x)
        loss = task_loss("regression", out.logits, y)
        if hasattr(model, "target_loss"):
            loss = loss + model.target_loss(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def infer() -> None:
        model.eval()
        with torch.no_grad():
            model(x)

    encoders = stackable(model)
    modes = ["off", "on"] if len(encoders) > 1 and args.stack == "both" else [args.stack]
    if len(encoders) <= 1:
        modes = ["-"]
    times: dict[str, dict[str, list[float]]] = {m: {"train": [], "infer": []} for m in modes}
    for _ in range(args.repeats):
        for mode in modes:
            for e in encoders:
                e.stack = mode != "off"
            # timed() gives milliseconds
            times[mode]["train"].append(timed(train_step, device, args.warmup, args.steps) / 1000)
            times[mode]["infer"].append(timed(infer, device, args.warmup, args.steps) / 1000)
    steps = len(dm.train_dataloader()) * int(cfg.trainer.max_epochs)
    rows = []
    for mode in modes:
        train_s, infer_s = statistics.median(times[mode]["train"]), statistics.median(times[mode]["infer"])
        rows.append(
            {
                "experiment": experiment,
                "stacked": mode,
                "train_s": train_s,
                "infer_s": infer_s,
                "epochs": int(cfg.trainer.max_epochs),
                "est_min": train_s * steps / 60,
                "params": sum(p.numel() for p in model.parameters()),
            }
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sector", default="fnb", choices=["fnb", "health", "tech"])
    p.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    p.add_argument("--variants", nargs="+", default=["base", "pro"], choices=["base", "pro"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--stack", default="both", choices=["both", "on", "off"], help="per-stock Transformers")
    p.add_argument("--repeats", type=int, default=1, help="interleaved rounds (medians over them)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    rows = []
    for m in args.models:
        for v in args.variants:
            rows += bench(f"pro_t4_{args.sector}_{m}_{v}", args)
            # a long sweep keeps what it measured if a later model runs out of memory
            print(rows[-2:] if rows[-1]["stacked"] == "on" else rows[-1], flush=True)
    threads = torch.get_num_threads() if args.device == "cpu" else "-"
    lines = [
        (
            f"Table 4 models on {args.sector} ({args.device}, {threads} thread(s), batch 16, 500 steps; "
            f"`python scripts/bench_stocks.py --sector {args.sector} --models {' '.join(args.models)} "
            f"--variants {' '.join(args.variants)} --steps {args.steps} --warmup {args.warmup} "
            f"--stack {args.stack} --repeats {args.repeats}`)"
        ),
        "",
        "| experiment | params | stacked | train step (s) | inference batch (s) | epochs "
        "| est. training (min) |",
        "| --- | ---: | :---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['experiment']} | {r['params']:,} | {r['stacked']} | {r['train_s']:.3f} | {r['infer_s']:.3f} | "
        f"{r['epochs']} | {r['est_min']:.1f} |"
        for r in rows
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
