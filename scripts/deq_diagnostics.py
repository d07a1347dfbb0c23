"""Write diagnostics.json (DEQ convergence traces, gate shares) for finished runs from their best
checkpoint, e.g. for runs made before the DEQDiagnostics callback existed.

    python scripts/deq_diagnostics.py results/runs/deq_t1_rosmap_deq_all/seed=*
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import fusionbench.train  # noqa: F401  (registers the config resolvers)
from fusionbench.errors import FusionbenchError
from fusionbench.fusion.deq.callbacks import deq_diagnostics
from fusionbench.records import write_json
from fusionbench.runs import load_run


def run(folder: Path, steps: int) -> str:
    _, dm, task = load_run(folder)
    batch = next(iter(dm.test_dataloader()))
    result = deq_diagnostics(task.model, batch["inputs"], steps)
    if result is None:
        return "no DEQ fusion in this model"
    write_json(folder / "diagnostics.json", result, indent=1, sort_keys=False, allow_nan=False)
    return "written"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders (holding .hydra/ and checkpoints/)")
    p.add_argument("--steps", type=int, default=100)
    args = p.parse_args()
    failed = 0
    for folder in args.runs:
        try:
            status = run(folder, args.steps)
        except FusionbenchError as e:
            status = f"failed: {e}"
        failed += status != "written"
        print(f"{folder}: {status}")
    sys.exit(1 if failed == len(args.runs) else 0)


if __name__ == "__main__":
    main()
