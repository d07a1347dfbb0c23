"""The default command on CPU and GPU, seed by seed, from the records `scripts/gpu_check_deq.sh` collects.

python scripts/gpu_check_table.py results/deq_gpu_check/records.jsonl > results/deq_cpu_gpu.md
"""

from __future__ import annotations

import argparse
import json
import statistics

LABELS = {
    "cpu": "`python train.py trainer=cpu`",
    "gpu": "`python train.py trainer=gpu`",
    "gpu_graph": "`python train.py trainer=gpu fusion.fixed_iterations=true fusion.cuda_graph=true`",
}


def main(path: str) -> None:
    records = [json.loads(line) for line in open(path)]
    seeds = sorted({r["seed"] for r in records})
    by = {(r["name"], r["seed"]): r for r in records}
    print(
        "| command | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " | mean ± std | selected epochs | test solves converged |"
    )
    print("|---|" + "---:|" * len(seeds) + "---:|---|---:|")
    for name, label in LABELS.items():
        runs = [by.get((name, s)) for s in seeds]
        accs = [100 * r["metrics"]["test/acc"] for r in runs if r]
        cells = [f"{100 * r['metrics']['test/acc']:.1f}" if r else "not run" for r in runs]
        epochs = ", ".join(f"{r['best_val']['epoch']}/{r['epochs_trained']}" for r in runs if r)
        conv = min((r["deq_solver"]["test_forward"]["converged"] for r in runs if r), default=float("nan"))
        spread = f"{statistics.mean(accs):.1f} ± {statistics.stdev(accs):.1f}" if len(accs) > 1 else "n/a"
        print(f"| {label} | " + " | ".join(cells) + f" | {spread} | {epochs} | {conv:.2f} (min) |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", help="the records.jsonl that scripts/gpu_check_deq.sh writes")
    main(parser.parse_args().records)
