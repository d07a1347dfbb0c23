"""Wall time per test sample of trained DynMM models: hard routing (the gate, then only the selected expert
for each sample) against running every expert, each expert alone and the gate alone.

    python scripts/bench_dynmm.py results/runs/dynmm_avmnist_gumbel_lam0.3/seed=0 [RUN ...] \
        --samples 1000 --batch 1 40 --threads 1 --out results/dynmm_timing.md

Each RUN is a finished DynMM run folder with its ``.hydra/config.yaml`` and a checkpoint under
``checkpoints/`` (the tested one, as `fusionbench.runs.selected_checkpoint` finds it). The model is
rebuilt from the run's config, loaded, and timed by `fusionbench.fusion.dynmm.timing.time_routing` (the same
measurement a DynMM run writes to its record as ``dynmm_timing``) on the first ``--samples`` test samples.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fusionbench.errors import FusionbenchError
from fusionbench.fusion.dynmm.timing import find_dynmm, first_test_inputs, time_routing
from fusionbench.runs import load_run, run_config


def bench(run: Path, args: argparse.Namespace) -> dict:
    try:
        target = str(run_config(run).get("fusion", {}).get("_target_", ""))
        if "DynMM" not in target:
            raise SystemExit(f"{run} is not a fusion=dynmm run (its fusion is {target}).")
        # the run's own checkpoint holds the trained experts: no stage-I loading, nothing frozen
        _, dm, task = load_run(run, {"fusion.stage1_ckpt": None, "fusion.freeze_experts": False})
    except FusionbenchError as e:
        raise SystemExit(str(e)) from None
    model = find_dynmm(task)
    dm.setup("test")
    out = time_routing(model, first_test_inputs(dm, args.samples), args.batch, args.repeats)
    print(run, out, flush=True)
    return {"run": run, "names": list(model.expert_names), **out}


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    names = rows[0]["names"]
    head = [
        "run",
        "batch",
        *[f"share {n}" for n in names],
        "routed",
        "every expert",
        *names,
        "gate",
        "every / routed",
    ]
    lines = [
        "### DynMM inference time per test sample: hard routing against every expert",
        "",
        f"`python scripts/bench_dynmm.py {' '.join(str(r['run']) for r in rows)} --samples {args.samples} "
        f"--batch {' '.join(str(b) for b in args.batch)} --threads {args.threads} --repeats {args.repeats}` "
        f"(torch {torch.__version__}, {args.threads} CPU thread(s){args.note}). Milliseconds per sample: the "
        "time of a pass over the samples in batches of the given size / samples, median of the repeats "
        "after a warm-up (`fusionbench.fusion.dynmm.timing`). routed = DynMM's inference (gate, then each "
        "sample's selected expert only); every expert = gate + all experts on every sample; the expert and "
        "gate columns run alone. Shares: fraction of these samples routed to each expert (soft gating: the "
        "mean gate weights; its routed pass runs every expert).",
        "",
        "| " + " | ".join(head) + " |",
        "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |",
    ]
    for r in rows:
        for b, ms in r["ms_per_sample"].items():
            cells = [
                str(r["run"]).split("runs/")[-1],
                b,
                *[f"{r['shares'][n]:.2f}" for n in names],
                f"{ms['routed']:.3f}",
                f"{ms['every_expert']:.3f}",
                *[f"{ms[f'expert_{n}']:.3f}" for n in names],
                f"{ms['gate']:.3f}",
                f"{ms['speedup']:.2f}x",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    worst = max(r["max_abs_diff"] for r in rows)
    lines += [
        "",
        "Outputs equal the selected expert's outputs (soft gating: the gate-weighted mixture of every "
        f"expert's outputs) on the same samples, max |difference| {worst:.1e}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 40])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--note", default="", help="appended to the setup line, e.g. ', beside two training jobs'")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    md = markdown([bench(run, args) for run in args.runs], args)
    print(md)
    if args.out:
        args.out.write_text(md)


if __name__ == "__main__":
    main()
