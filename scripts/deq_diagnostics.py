"""Write diagnostics.json (DEQ convergence traces, gate shares) for finished runs from their best
checkpoint, e.g. for runs made before the DEQDiagnostics callback existed.

    python scripts/deq_diagnostics.py results/runs/deq_t1_rosmap_deq_all/seed=*
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf, open_dict

import fusionbench.train  # noqa: F401  (registers the config resolvers)
from fusionbench.fusion.deq.callbacks import deq_diagnostics
from fusionbench.records import write_json
from fusionbench.train import build


def run(folder: Path, steps: int) -> str:
    if not (folder / ".hydra" / "config.yaml").is_file():
        return "not a run folder (no .hydra/config.yaml)"
    cfg = OmegaConf.load(folder / ".hydra" / "config.yaml")
    with open_dict(cfg):
        cfg.paths.output_dir = str(folder)
    ckpts = sorted((folder / "checkpoints").glob("epoch*.ckpt"))
    if not ckpts:
        return "no best checkpoint (checkpoints/epoch*.ckpt)"
    torch.manual_seed(int(cfg.seed))
    dm, task = build(cfg)
    task.load_state_dict(torch.load(ckpts[-1], map_location="cpu", weights_only=False)["state_dict"])
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
        status = run(folder, args.steps)
        failed += status != "written"
        print(f"{folder}: {status}")
    sys.exit(1 if failed == len(args.runs) else 0)


if __name__ == "__main__":
    main()
