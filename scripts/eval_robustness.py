"""Robustness curves for finished runs: evaluates each run's tested checkpoint on its test split under a noise
grid of configs/robustness/ and writes ``robustness.json`` into the run folder, which `make tables` reads as
the run's curves when training did not measure them (`fusionbench.tables.collect.attach_robustness`).
A folder that is not a finished run, or a grid that does not fit its data, is reported and skipped.

    python scripts/eval_robustness.py --grid rgbd results/runs/dynmm_rgbd_synthetic_esanet/seed=*
    python scripts/eval_robustness.py --grid rgbd --set seeds=[0,1,2] RUN     # a smaller grid

The same as training with ``robustness=<grid>``, without retraining (`fusionbench.runs.load_run`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml
from omegaconf import OmegaConf

import fusionbench.train  # noqa: F401  (registers the config resolvers)
from fusionbench import ROOT
from fusionbench.errors import ConfigError, FusionbenchError
from fusionbench.records import write_json
from fusionbench.robustness import run_grid
from fusionbench.runs import load_run, selected_checkpoint
from fusionbench.tables.collect import ROBUSTNESS_NAME


def grid_config(name: str, sets: list[str]) -> dict:
    path = ROOT / "configs" / "robustness" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"No robustness grid {name!r}; configs/robustness/ has {known}.")
    grid = OmegaConf.load(path)
    for item in sets:
        key, _, value = item.partition("=")
        OmegaConf.update(grid, key, yaml.safe_load(value))
    return OmegaConf.to_container(grid, resolve=True)


def evaluate_run(folder: Path, grid: dict) -> str:
    _, dm, task = load_run(folder)
    checkpoint = selected_checkpoint(folder)
    dm.setup("test")
    start = time.time()
    robustness = run_grid(task, dm, grid)
    write_json(
        folder / ROBUSTNESS_NAME,
        {"checkpoint": checkpoint.name, "grid": grid.get("name"), "robustness": robustness},
        indent=1,
        sort_keys=False,
        allow_nan=False,
    )
    return f"written ({time.time() - start:.0f} s)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "runs", nargs="+", type=Path, help="run folders (holding .hydra/, checkpoints/, metrics.json)"
    )
    p.add_argument("--grid", required=True, help="a grid of configs/robustness/ (e.g. rgbd, gaussian)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="override a grid key: key=value")
    args = p.parse_args()
    try:
        grid = grid_config(args.grid, args.sets)
    except FusionbenchError as e:
        sys.exit(f"eval_robustness: {e}")
    failed = 0
    for folder in args.runs:
        try:
            status = evaluate_run(folder, grid)
        except FusionbenchError as e:
            status = f"failed: {e}"
        failed += not status.startswith("written")
        print(f"{folder}: {status}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
