"""The run loop: ``train(cfg)`` builds datamodule, encoders, fusion model, task and trainer from the
composed config, fits, tests the selected checkpoint and writes the run record ``metrics.json``.

``main()`` is the Hydra entry point behind ``python train.py``; it turns `FusionbenchError` (and
config instantiation errors) into one clear message and a non-zero exit code.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fusionbench import ROOT, experiments
from fusionbench.data.base import FusionDataModule
from fusionbench.errors import ConfigError, FusionbenchError
from fusionbench.records import RunRecord, git_state, runtime_info
from fusionbench.task import FusionTask

log = logging.getLogger("fusionbench")

OmegaConf.register_new_resolver("fb.root", lambda: str(ROOT), replace=True)
OmegaConf.register_new_resolver(
    "fb.mul", lambda a, b: int(a) * int(b), replace=True
)  # widths derived from a swept one
# like oc.env, but an empty variable also falls back to the default (WANDB_MODE= means "not set")
OmegaConf.register_new_resolver("fb.env", lambda name, default: os.environ.get(name) or default, replace=True)
# the results tables' rows become `experiment=<row>` options;
# importing this module is enough (notebooks, launcher jobs)
experiments.register()


def build_encoders(backbone: DictConfig, dm: FusionDataModule) -> nn.ModuleDict:
    """One encoder per dataset modality: ``backbone.<modality>``, else ``backbone._default_`` (one encoder
    config for every modality, e.g. one LSTM per stock whatever the sector's tickers). ``input_dim`` comes
    from the data, never from YAML."""
    default = backbone.get("_default_")
    missing = [m for m in dm.modalities if m not in backbone and default is None]
    if missing:
        raise ConfigError(
            f"Dataset '{dm.name}' provides modalities {dm.modalities} but the backbone has encoders only for "
            f"{sorted(backbone)} (missing {missing}) and no `_default_`. Pick a matching `backbone=` or set "
            "`dataset.modalities`."
        )
    encoders = {}
    for m in dm.modalities:
        node = backbone[m] if m in backbone else default
        params = inspect.signature(get_class(node._target_)).parameters
        if "input_dim" in params:
            given = node.get("input_dim")
            if given is not None and int(given) != dm.input_dims[m]:
                raise ConfigError(
                    f"backbone.{m}.input_dim={given} but dataset '{dm.name}' has {dm.input_dims[m]} features "
                    f"for '{m}'. Remove `input_dim` from the backbone config (it is taken from the data)."
                )
            encoders[m] = instantiate(node, input_dim=dm.input_dims[m], _convert_="all")
        else:
            encoders[m] = instantiate(node, _convert_="all")
    return nn.ModuleDict(encoders)


def instantiate_all(node: DictConfig | None) -> list[Any]:
    """Instantiate every child with a ``_target_`` (callbacks, loggers)."""
    if not node:
        return []
    return [
        instantiate(child, _convert_="all")
        for child in node.values()
        if isinstance(child, DictConfig) and "_target_" in child
    ]


def resolve_ckpt_path(cfg: DictConfig, output_dir: Path) -> str | None:
    if cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path)
        if not path.is_file():
            raise ConfigError(
                f"ckpt_path={cfg.ckpt_path} does not exist. Give the path of a `.ckpt` file from a run's "
                "checkpoints/ folder."
            )
        return str(path)
    last = output_dir / "checkpoints" / "last.ckpt"
    if cfg.train and cfg.get("resume", True) and last.is_file():
        log.info("Resuming from %s", last)
        return str(last)
    return None


def build(cfg: DictConfig) -> tuple[FusionDataModule, FusionTask]:
    """Datamodule (files checked, data loaded) and the LightningModule."""
    dm: FusionDataModule = instantiate(cfg.dataset, _convert_="all")
    dm.prepare_data()
    dm.setup("fit")
    encoders = build_encoders(cfg.backbone, dm)
    model = instantiate(cfg.fusion, encoders=encoders, num_outputs=dm.num_outputs, _convert_="all")
    task = FusionTask(
        model,
        task_type=dm.task_type,
        num_outputs=dm.num_outputs,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        regression_loss=getattr(dm, "regression_loss", "mse"),
        extra_metrics=tuple(getattr(dm, "extra_metrics", ())),
    )
    return dm, task


def load_tested(task: FusionTask, test_ckpt: str | None) -> None:
    """The tested checkpoint's weights; under ddp_spawn this process's module never saw them."""
    if test_ckpt:
        task.load_state_dict(torch.load(test_ckpt, map_location="cpu", weights_only=False)["state_dict"])


def robustness_curves(grid: DictConfig, dm: FusionDataModule, task: FusionTask) -> dict[str, Any]:
    """The test split under the `robustness` grid (``task`` holds the tested weights)."""
    from fusionbench.robustness import run_grid

    return run_grid(task, dm, OmegaConf.to_container(grid, resolve=True))


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one experiment; returns (the run record, the objects built)."""
    start = time.time()
    git = git_state()  # the code this process runs: taken before any later edit of the work tree
    output_dir = Path(cfg.paths.output_dir)
    record = RunRecord(output_dir)
    if cfg.train and record.is_complete() and not cfg.get("force", False):
        log.info("%s already holds a finished run; skipping it (force=true reruns it).", output_dir)
        return record.load(), {}
    pl.seed_everything(cfg.seed, workers=True)
    dm, task = build(cfg)
    ckpt_path = resolve_ckpt_path(cfg, output_dir)
    if not cfg.train and ckpt_path is None:
        raise ConfigError("train=false evaluates a checkpoint: give one with ckpt_path=PATH.")
    callbacks = instantiate_all(cfg.get("callbacks"))
    loggers = instantiate_all(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, _convert_="partial"
    )

    if cfg.train:
        trainer.fit(task, datamodule=dm, ckpt_path=ckpt_path)
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        test_ckpt = best or None  # no checkpointing (debug, callbacks=none): the final weights
    else:
        test_ckpt = ckpt_path
    test_metrics = trainer.test(task, datamodule=dm, ckpt_path=test_ckpt)[0] if cfg.test else {}

    if (cfg.test or cfg.get("robustness")) and trainer.is_global_zero:
        load_tested(task, test_ckpt)  # what follows looks at the tested weights
    robustness = (
        robustness_curves(cfg.robustness, dm, task)
        if cfg.get("robustness") and trainer.is_global_zero
        else None
    )
    result = runtime_info(
        cfg, dm, task, trainer, test_metrics, test_ckpt, wall_time_s=time.time() - start, git=git
    )
    if robustness is not None:
        result["robustness"] = robustness
    for callback in callbacks:  # a method's callback adds its entries (DEQ solver convergence, DynMM timing)
        if hasattr(callback, "record"):
            result.update(callback.record(task=task, datamodule=dm, tested=bool(cfg.test)))
    if trainer.is_global_zero and not (cfg.trainer.get("fast_dev_run") and cfg.train):
        record.write(result)
    return result, {"datamodule": dm, "task": task, "trainer": trainer}


def explain(exc: BaseException) -> str | None:
    """The user-facing message of an error we know how to explain, else None."""
    for e in (exc, exc.__cause__, exc.__context__):
        if isinstance(e, FusionbenchError):
            return str(e)
    if isinstance(exc, InstantiationException):
        return (
            f"Could not build an object from the config: {exc}. Check the keys of that config node "
            "(`python train.py --cfg job` prints the composed config)."
        )
    return None


@hydra.main(version_base="1.3", config_path=str(ROOT / "configs"), config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        result, _ = train(cfg)
    except Exception as exc:  # noqa: BLE001 - only known errors are turned into messages
        message = explain(exc)
        if message is None:
            raise
        log.error("%s", message)
        print(f"\nfusionbench: {message}", file=sys.stderr)
        sys.exit(1)
    return (result.get("best_val") or {}).get("value")


__all__ = ["build", "build_encoders", "main", "train"]
