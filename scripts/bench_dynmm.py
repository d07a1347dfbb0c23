"""Wall time per test sample of trained DynMM models: hard routing (the gate, then only the selected expert
for each sample) against running every expert, each expert alone and the gate alone.

    python scripts/bench_dynmm.py results/runs/dynmm_avmnist_gumbel_lam0.3/seed=0 [RUN ...] \
        --samples 1000 --batch 1 40 --threads 1 --out results/dynmm_timing.md

Each RUN is a finished DynMM run folder with its ``.hydra/config.yaml`` and a checkpoint under
``checkpoints/`` (the tested one: ``epoch*.ckpt``; ``last.ckpt`` when there is no other). The model is
rebuilt from the run's config, loaded, and timed in eval mode without gradients on the first
``--samples`` test samples, cut into batches of each ``--batch`` size: the total time over all batches
divided by the samples, the median of ``--repeats`` passes after one warm-up pass. "every expert" is the
gate plus every expert on every sample (what soft gating or a static ensemble of the experts costs);
"routed" is DynMM's inference (`DynMMFusion.forward`, which splits the batch by decision). The script
also checks that the routed outputs equal the selected expert's outputs on the same samples.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from fusionbench.fusion import DynMMFusion
from fusionbench.fusion.dynmm import take
from fusionbench.train import build


def checkpoint(run: Path) -> Path:
    found = sorted((run / "checkpoints").glob("epoch*.ckpt")) or sorted((run / "checkpoints").glob("last.ckpt"))
    if len(found) != 1:
        raise SystemExit(f"{run}/checkpoints holds {[p.name for p in found] or 'no checkpoint'}; expected one epoch*.ckpt or last.ckpt")
    return found[0]


def load(run: Path) -> tuple[DynMMFusion, dict[str, torch.Tensor], str]:
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    cfg.paths.output_dir = str(run)
    cfg.fusion.stage1_ckpt = None  # the run's own checkpoint holds the trained experts
    cfg.fusion.freeze_experts = False
    dm, task = build(cfg)
    ckpt = checkpoint(run)
    task.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"])
    model = next((m for m in task.modules() if isinstance(m, DynMMFusion)), None)
    if model is None:
        raise SystemExit(f"{run} is not a fusion=dynmm run")
    dm.setup("test")
    parts: list[dict[str, torch.Tensor]] = []
    count = 0
    for batch in dm.test_dataloader():
        parts.append(batch["inputs"])
        count += next(iter(batch["inputs"].values())).shape[0]
        if count >= ARGS.samples:
            break
    inputs = {m: torch.cat([p[m] for p in parts])[: ARGS.samples] for m in parts[0]}
    return model.eval(), inputs, ckpt.name


def pass_time(fn, inputs: dict[str, torch.Tensor], batch: int) -> float:
    """Seconds of one pass of ``fn`` over ``inputs`` in batches; median of the repeats after a warm-up."""
    n = next(iter(inputs.values())).shape[0]
    chunks = [take(inputs, slice(i, i + batch)) for i in range(0, n, batch)]
    times = []
    for r in range(ARGS.repeats + 1):
        t0 = time.perf_counter()
        with torch.no_grad():
            for x in chunks:
                fn(x)
        if r:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(run: Path) -> list[dict]:
    model, inputs, ckpt = load(run)
    n = next(iter(inputs.values())).shape[0]
    names = model.expert_names
    with torch.no_grad():
        index = model.gate(inputs).argmax(dim=-1)
        routed = model(inputs).logits
        every = model._run_all(inputs)
    chosen = torch.stack([every[name].logits for name in names], dim=1)[torch.arange(n), index]
    max_diff = float((routed - chosen).abs().max())
    shares = {name: float((index == i).float().mean()) for i, name in enumerate(names)}
    rows = []
    for b in ARGS.batch:
        ms = {
            "routed": pass_time(model, inputs, b),
            "every expert": pass_time(lambda x: (model.gate(x), model._run_all(x)), inputs, b),
            "gate": pass_time(model.gate, inputs, b),
        }
        for name in names:
            ms[name] = pass_time(lambda x, name=name: model.experts[name](model.expert_inputs(x, name)), inputs, b)
        ms = {k: 1000.0 * v / n for k, v in ms.items()}
        rows.append({"run": str(run), "ckpt": ckpt, "batch": b, "samples": n, "shares": shares, "ms": ms,
                     "max_diff": max_diff, "names": names})
        print(f"{run} batch {b}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items()) +
              f"; shares {shares}; routed vs selected expert max |diff| {max_diff:.2e}", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    names = rows[0]["names"]
    head = ["run", "batch", *[f"share {n}" for n in names], "routed", "every expert", *names, "gate", "every / routed"]
    lines = [
        "### DynMM inference time per test sample: hard routing against every expert",
        "",
        f"`python scripts/bench_dynmm.py {' '.join(sorted({r['run'] for r in rows}))} --samples {rows[0]['samples']} "
        f"--batch {' '.join(str(b) for b in ARGS.batch)} --threads {ARGS.threads} --repeats {ARGS.repeats}` "
        f"(torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s){ARGS.note}). Milliseconds per sample: the time of "
        "a pass over the samples in batches of the given size / samples, median of the repeats. routed = DynMM's "
        "inference (gate, then each sample's selected expert only); every expert = gate + all experts on every sample; "
        "the expert and gate columns run alone. Shares: fraction of these samples routed to each expert.",
        "",
        "| " + " | ".join(head) + " |",
        "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |",
    ]
    for r in rows:
        ms = r["ms"]
        cells = [r["run"].split("runs/")[-1], str(r["batch"]), *[f"{r['shares'][n]:.2f}" for n in names],
                 f"{ms['routed']:.3f}", f"{ms['every expert']:.3f}", *[f"{ms[n]:.3f}" for n in names], f"{ms['gate']:.3f}",
                 f"{ms['every expert'] / ms['routed']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    worst = max(r["max_diff"] for r in rows)
    lines += ["", f"Routed outputs equal the selected expert's outputs on the same samples (max |difference| {worst:.1e})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    global ARGS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 40])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--note", default="", help="appended to the setup line, e.g. ', beside two training jobs'")
    p.add_argument("--out", type=Path, default=None)
    ARGS = p.parse_args()
    torch.set_num_threads(ARGS.threads)
    rows = [row for run in ARGS.runs for row in bench(run)]
    md = markdown(rows)
    print(md)
    if ARGS.out:
        ARGS.out.write_text(md)


ARGS: argparse.Namespace

if __name__ == "__main__":
    main()
