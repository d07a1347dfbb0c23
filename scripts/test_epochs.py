"""Test every epoch's checkpoint of finished runs, to see how test metrics move over training where the
run itself tests one checkpoint. Writes ``epoch_tests.json`` ({checkpoint name: test metrics}) into each
run folder and prints test accuracy (or loss) per epoch. Runs keep only their selected checkpoint by default,
so train the run with every epoch kept:

    python train.py experiment=pro_t1_avmnist_mfm_base sweep=seeds seed=2 paths.results_dir=/tmp/epochs \\
        callbacks.model_checkpoint.save_top_k=-1
    python scripts/test_epochs.py /tmp/epochs/runs/pro_t1_avmnist_mfm_base/seed=2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytorch_lightning as pl

import fusionbench.train  # noqa: F401  (registers the config resolvers)
from fusionbench.errors import ConfigError, FusionbenchError
from fusionbench.records import write_json
from fusionbench.runs import load_run


def evaluate_epochs(folder: Path) -> dict[str, dict[str, float]]:
    """``{epochNNN.ckpt: test metrics}`` for every epoch checkpoint of ``folder``, in epoch order."""
    checkpoints = sorted((folder / "checkpoints").glob("epoch*.ckpt"))
    if not checkpoints:
        raise ConfigError(
            f"{folder}/checkpoints holds no epoch checkpoint; train the run with "
            "callbacks.model_checkpoint.save_top_k=-1 to keep every epoch's."
        )
    tested = {}
    for ckpt in checkpoints:
        _, dm, task = load_run(folder, checkpoint=ckpt)
        trainer = pl.Trainer(
            accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
        )
        tested[ckpt.name] = {
            k: float(v) for k, v in trainer.test(task, datamodule=dm, verbose=False)[0].items()
        }
    write_json(folder / "epoch_tests.json", tested, indent=1, sort_keys=False, allow_nan=False)
    return tested


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders (holding .hydra/ and checkpoints/)")
    args = p.parse_args()
    failed = 0
    for folder in args.runs:
        try:
            tested = evaluate_epochs(folder)
        except FusionbenchError as e:
            print(f"{folder}: failed: {e}")
            failed += 1
            continue
        key = "test/acc" if all("test/acc" in m for m in tested.values()) else "test/loss"
        print(f"{folder}: {key} " + ", ".join(f"{name} {m[key]:.4f}" for name, m in tested.items()))
    sys.exit(1 if failed == len(args.runs) else 0)


if __name__ == "__main__":
    main()
