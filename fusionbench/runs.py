"""A finished run, reloaded: its composed config, the checkpoint it was tested with, and the model built from
both. Every script that looks at a trained model goes through `load_run`, and DynMM's stage-I loading through
`checkpoint_state`, so a run folder is read one way everywhere."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from fusionbench.errors import ConfigError

CONFIG = Path(".hydra") / "config.yaml"


def run_config(run: str | Path) -> DictConfig:
    """The run's composed config (``.hydra/config.yaml``), with ``paths.output_dir`` pointing at the
    folder."""
    run = Path(run)
    if not (run / CONFIG).is_file():
        raise ConfigError(
            f"{run} is not a run folder (no {CONFIG}); pass results/runs/<experiment>/seed=<n> or a run's "
            "output folder."
        )
    cfg = OmegaConf.load(run / CONFIG)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run)
    return cfg


def selected_checkpoint(run: str | Path) -> Path:
    """The checkpoint the run was tested with: the one its record names, else the single ``epoch*.ckpt`` that
    ``save_top_k=1`` leaves. ``last.ckpt`` is never chosen silently: it is the latest epoch, not the selected
    one."""
    folder = Path(run) / "checkpoints"
    record = Path(run) / "metrics.json"
    if record.is_file():
        name = json.loads(record.read_text()).get("test_checkpoint")
        if name and (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("epoch*.ckpt"))
    if len(found) != 1:
        raise ConfigError(
            f"{folder} holds {[p.name for p in found] or 'no epoch*.ckpt'}; expected the one selected "
            "checkpoint. Checkpoints are not committed with run records: rerun the experiment to get them, "
            "or pass the checkpoint itself."
        )
    return found[0]


def checkpoint_state(
    path: str | Path, what: str = "checkpoint", missing_hint: str = ""
) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a Lightning ``.ckpt`` (or of a bare state dict). A glob such as
    ``.../checkpoints/epoch*.ckpt`` must match exactly one file. ``what`` names the setting in error messages;
    ``missing_hint`` says what to pass instead when the file does not exist."""
    p = Path(path)
    if not p.is_file() and any(c in str(path) for c in "*?["):
        matches = sorted(p.parent.glob(p.name)) if not any(c in str(p.parent) for c in "*?[") else []
        if len(matches) > 1:
            raise ConfigError(
                f"{what}={path} matches {len(matches)} files ({', '.join(m.name for m in matches)}); "
                "name one checkpoint, or a pattern that matches exactly one."
            )
        p = matches[0] if matches else p
    if not p.is_file():
        raise ConfigError(f"{what}={path} does not exist." + (f" {missing_hint}" if missing_hint else ""))
    ckpt = torch.load(p, map_location="cpu", weights_only=False)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else None
    if not isinstance(state, Mapping):
        raise ConfigError(
            f"{what}={path} holds no state_dict; pass a Lightning .ckpt from a run's checkpoints/ folder."
        )
    return dict(state)


def load_run(
    run: str | Path, overrides: Mapping[str, Any] | None = None, checkpoint: str | Path | None = None
):
    """``(cfg, datamodule, task)`` of a finished run with the weights of its selected checkpoint (or
    ``checkpoint``). ``overrides`` are dotted keys set on the config before building
    (e.g. ``{"fusion.stage1_ckpt": None}``)."""
    from fusionbench.train import build  # train imports the whole stack; keep this module light

    cfg = run_config(run)
    if cfg.get("fusion") is not None and cfg.fusion.get("stage1_ckpt") is not None:
        cfg.fusion.stage1_ckpt = None  # DynMM's stage I: the tested checkpoint below holds every weight
    for key, value in (overrides or {}).items():
        OmegaConf.update(cfg, key, value, force_add=True)
    torch.manual_seed(int(cfg.seed))
    dm, task = build(cfg)
    task.load_state_dict(checkpoint_state(checkpoint or selected_checkpoint(run)))
    return cfg, dm, task
