"""Linear probes of each modality's representation over Pro-Fusion's unroll steps (Figure 13), for
finished runs: writes ``linear_probe.json`` ({modality: {step: test accuracy}}) into each run folder,
which `make tables` turns into results/pro_fig13_*. A base model's run gets step 1 only (its encoders).

    python scripts/linear_probe.py results/runs/pro_t1_avmnist_lf_pro/seed=*
    python scripts/linear_probe.py RUN --steps 4 --train-samples 5000   # probe beyond the trained R
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import fusionbench.train  # noqa: F401  (registers the config resolvers)
from fusionbench.errors import FusionbenchError
from fusionbench.fusion.profusion.probe import linear_probe
from fusionbench.records import write_json
from fusionbench.runs import load_run


def run(folder: Path, steps: int | None, train_samples: int) -> str:
    _, dm, task = load_run(folder)
    dm.setup("test")
    acc = linear_probe(
        task.model, dm.train_dataloader(), dm.test_dataloader(), dm.num_outputs, steps, train_samples
    )
    write_json(
        folder / "linear_probe.json",
        {m: {str(t + 1): a for t, a in enumerate(v)} for m, v in acc.items()},
        indent=1,
        sort_keys=False,
        allow_nan=False,
    )
    return "written: " + ", ".join(f"{m} " + " -> ".join(f"{a:.3f}" for a in v) for m, v in acc.items())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders (holding .hydra/ and checkpoints/)")
    p.add_argument("--steps", type=int, help="unroll steps to probe (default: the model's R)")
    p.add_argument(
        "--train-samples", type=int, default=10000, help="training samples the probes are fitted on"
    )
    args = p.parse_args()
    failed = 0
    for folder in args.runs:
        try:
            status = run(folder, args.steps, args.train_samples)
        except FusionbenchError as e:
            status = f"failed: {e}"
        failed += not status.startswith("written")
        print(f"{folder}: {status}")
    sys.exit(1 if failed == len(args.runs) else 0)


if __name__ == "__main__":
    main()
