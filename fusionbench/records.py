"""Run records: the ``metrics.json`` every run writes next to its ``.hydra/`` folder.

A record is written once, atomically, when the run has finished; a folder without one is an
unfinished run and is never counted by the table builder.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from fusionbench import ROOT, __version__
from fusionbench.compute import model_compute
from fusionbench.errors import FusionbenchError

RECORD_NAME = "metrics.json"
EVALUATION_NAME = "evaluation.json"  # train=false: an evaluation never replaces the training record
RECORD_VERSION = 1
MAX_DIRTY_PATHS = 20  # enough to tell code edits from caption edits without bloating every record


class RunRecord:
    def __init__(self, output_dir: str | Path, name: str = RECORD_NAME) -> None:
        self.path = Path(output_dir) / name

    def is_complete(self) -> bool:
        try:
            return self.load().get("status") == "complete"
        except (OSError, ValueError):
            return False

    def load(self) -> dict[str, Any]:
        return json.loads(self.path.read_text())

    def write(self, record: dict[str, Any]) -> None:
        write_json(self.path, record)


def write_json(
    path: str | Path, data: Any, indent: int = 2, sort_keys: bool = True, allow_nan: bool = True
) -> None:
    """The one way fusionbench writes a JSON artefact: to a temporary file, then renamed over ``path``, so a
    reader (or a run resumed after a kill) sees the old file or the whole new one, never half of it. Run
    records allow NaN (a diverged metric is still a result); artefacts that tables plot pass
    ``allow_nan=False``."""
    write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan) + "\n")


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path`` (atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise FusionbenchError(
            f"Could not write {path}: {exc.strerror or exc}. Free disk space or make the folder writable "
            "(or point `paths.results_dir=` / `hydra.run.dir=` elsewhere); the run's checkpoints are kept, "
            "so the same command resumes it."
        ) from exc


def git_state(root: Path = ROOT) -> dict[str, Any]:
    """The commit the code runs at, whether tracked files differ from it, and which (at most
    ``MAX_DIRTY_PATHS``, with ``dirty_count`` saying how many there were): an edited table caption and an
    edited model are both "dirty", and only the paths tell a reader which one a run saw."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--verify", "-q", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
        sha = head.stdout.strip() if head.returncode == 0 else ""
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if status.returncode != 0:  # not a checkout: unknown, not clean
            return {"sha": sha or None, "dirty": None}
        paths = sorted(line[3:] for line in status.stdout.splitlines() if line.strip())
        return {
            "sha": sha or None,
            "dirty": bool(paths),
            "dirty_paths": paths[:MAX_DIRTY_PATHS],
            "dirty_count": len(paths),  # so a capped list never reads as the whole change
        }
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


def hydra_choices(cfg: DictConfig) -> tuple[dict[str, Any], list[str]]:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        hc = HydraConfig.get()
        choices = {
            k: v for k, v in OmegaConf.to_container(hc.runtime.choices).items() if not k.startswith("hydra/")
        }
        return choices, list(hc.overrides.task)
    return {}, []


def _float(v: Any) -> float:
    return float(v.item() if isinstance(v, torch.Tensor) else v)


def _best_from_checkpoint(state: dict[str, Any], ckpt_cb: Any) -> dict[str, Any] | None:
    """The best validation value as the checkpoint callback saved it in ``last.ckpt``."""
    for key, cb_state in (state.get("callbacks") or {}).items():
        if not (isinstance(cb_state, dict) and cb_state.get("best_model_score") is not None):
            continue
        if ckpt_cb.monitor and ckpt_cb.monitor not in str(key):
            continue
        best_path = cb_state.get("best_model_path")
        epoch = None
        if best_path and Path(best_path).is_file():
            epoch = torch.load(best_path, map_location="cpu", weights_only=False).get("epoch")
        return {
            "metric": ckpt_cb.monitor,
            "mode": ckpt_cb.mode,
            "value": _float(cb_state["best_model_score"]),
            "epoch": epoch,
        }
    return None


def host_info() -> dict[str, Any]:
    """Where a run ran. CPU kernels split their sums by thread, so the same seed and commit can train
    differently under another ``OMP_NUM_THREADS``; the thread count also sets the wall time."""
    return {
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def runtime_info(
    cfg,
    dm,
    task,
    trainer: pl.Trainer,
    test_metrics: dict,
    test_ckpt: str | None,
    wall_time_s: float,
    git: dict | None = None,
) -> dict[str, Any]:
    """Everything a table or a later reader needs to know about a finished run."""
    choices, overrides = hydra_choices(cfg)
    ckpt_cb = trainer.checkpoint_callback
    best_val = None
    if cfg.train and ckpt_cb is not None and ckpt_cb.best_model_path and ckpt_cb.best_model_score is not None:
        best_epoch = torch.load(ckpt_cb.best_model_path, map_location="cpu", weights_only=False).get("epoch")
        best_val = {
            "metric": ckpt_cb.monitor,
            "mode": ckpt_cb.mode,
            "value": _float(ckpt_cb.best_model_score),
            "epoch": best_epoch,
        }
    epochs, steps = int(trainer.current_epoch), int(trainer.global_step)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if cfg.train and last.is_file():  # ddp_spawn does not hand loop progress back to the main process
        state = torch.load(last, map_location="cpu", weights_only=False)
        epochs, steps = max(epochs, state["epoch"] + 1), max(steps, state["global_step"])
        if best_val is None and ckpt_cb is not None:  # nor the checkpoint callback's best score
            best_val = _best_from_checkpoint(state, ckpt_cb)
    params = list(task.model.parameters())
    return {
        "status": "complete",
        "record_version": RECORD_VERSION,
        "experiment_name": cfg.get("experiment_name"),
        "seed": int(cfg.seed),
        "choices": choices,
        "overrides": overrides,
        "metrics": {k: _float(v) for k, v in sorted(test_metrics.items())},
        "best_val": best_val,
        "test_checkpoint": Path(test_ckpt).name if test_ckpt else "final weights",
        "epochs_trained": epochs,
        "global_steps": steps,
        "selection": getattr(dm, "selection", "val"),
        "data": dm.describe(),
        "params": {
            "total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad),
        },
        "compute": model_compute(
            task.model, dm
        ),  # MAdds at batch 1 (fusionbench.compute); {"error": ...} if uncountable
        "wall_time_s": round(wall_time_s, 2),
        "git": git or git_state(),
        "host": host_info(),
        "versions": {
            "fusionbench": __version__,
            "torch": torch.__version__,
            "pytorch_lightning": pl.__version__,
        },
        "fast_dev_run": bool(cfg.trainer.get("fast_dev_run", False)),
    }
