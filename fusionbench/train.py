"""The run loop: ``train(cfg)`` builds datamodule, encoders, fusion model, task and trainer from the
composed config, fits, tests the selected checkpoint and writes the run record ``metrics.json``.

``main()`` is the Hydra entry point behind ``python train.py``; it turns `FusionbenchError` (and
config instantiation errors) into one clear message and a non-zero exit code.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parameter import UninitializedParameter, is_lazy

from fusionbench import ROOT, experiments
from fusionbench.data.base import FusionDataModule
from fusionbench.errors import ConfigError, FusionbenchError
from fusionbench.loggers import run_hparams
from fusionbench.records import EVALUATION_NAME, RunRecord, git_state, hydra_choices, runtime_info, write_json
from fusionbench.run_folder import (
    check_finished,
    check_same_config,
    config_hash,
    hashed_config,
    loadable,
    previous_config,
    resume_checkpoint,
    run_lock,
    write_config_files,
)
from fusionbench.task import FusionTask
from fusionbench.typecheck import check_types

log = logging.getLogger("fusionbench")

OmegaConf.register_new_resolver("fb.root", lambda: str(ROOT), replace=True)
OmegaConf.register_new_resolver(
    "fb.mul", lambda a, b: int(a) * int(b), replace=True
)  # widths derived from a swept one
# like oc.env, but an empty variable also falls back to the default (WANDB_MODE= means "not set")
OmegaConf.register_new_resolver("fb.env", lambda name, default: os.environ.get(name) or default, replace=True)
# an Optuna study's direction from the dataset's monitored mode (configs/hparams_search/optuna.yaml)
OmegaConf.register_new_resolver(
    "fb.direction", lambda mode: {"min": "minimize", "max": "maximize"}[mode], replace=True
)
# known third-party noise: data loaders on CPU, Lightning's pytree deprecation, resumed runs' folders (which
# fusionbench appends to, see fusionbench.loggers) and Lightning's advertisement
for _message in (
    ".*does not have many workers.*",
    ".*isinstance\\(treespec, LeafSpec\\).*",
    ".*exists and is not empty.*",
    ".*GPU available but not used.*",
):
    warnings.filterwarnings("ignore", message=_message)
logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
    lambda r: "litlogger" not in r.getMessage()
)
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
        # data-derived arguments (a word vocabulary's size) for the keys the YAML leaves unset
        data_args = {
            k: v
            for k, v in getattr(dm, "encoder_args", {}).get(m, {}).items()
            if k in params and node.get(k) is None
        }

        if "input_dim" in params:
            given = node.get("input_dim")
            if given is not None and int(given) != dm.input_dims[m]:
                raise ConfigError(
                    f"backbone.{m}.input_dim={given} but dataset '{dm.name}' has {dm.input_dims[m]} features "
                    f"for '{m}'. Remove `input_dim` from the backbone config (it is taken from the data)."
                )
            encoders[m] = instantiate(node, input_dim=dm.input_dims[m], **data_args, _convert_="all")
        else:
            encoders[m] = instantiate(node, **data_args, _convert_="all")
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


def checked_checkpoint(path: str) -> str:
    """A checkpoint given with ``ckpt_path=``: it must exist and load."""
    if not Path(path).is_file():
        raise ConfigError(
            f"ckpt_path={path} does not exist. Give the path of a `.ckpt` file from a run's checkpoints/ "
            "folder."
        )
    if not loadable(Path(path)):
        raise ConfigError(
            f"ckpt_path={path} does not load (truncated or not a checkpoint: was the disk full when it was "
            "written?). Give another checkpoint of that run (its checkpoints/ folder keeps the best epoch "
            "too)."
        )
    return path


def resume_from(cfg: DictConfig, output_dir: Path, config: dict[str, Any]) -> str | None:
    """The checkpoint a training run starts from: ``ckpt_path=``, else the folder's newest loadable checkpoint
    when it was made by this configuration (`fusionbench.run_folder`); ``force=true`` starts afresh."""
    if cfg.get("ckpt_path"):
        return checked_checkpoint(cfg.ckpt_path)
    if cfg.get("force", False):
        if (output_dir / "checkpoints").is_dir():
            shutil.rmtree(output_dir / "checkpoints")
            log.info("force=true: removed the checkpoints of %s; training from scratch.", output_dir)
        return None
    if not cfg.get("resume", True):
        return None
    last = resume_checkpoint(output_dir)
    if last is None:
        return None
    check_same_config(
        output_dir, previous_config(output_dir, None), config, f"an unfinished run ({last.name})"
    )
    log.info("Resuming from %s", last)
    return str(last)


def check_trains(cfg: DictConfig) -> None:
    if cfg.train and (cfg.trainer.get("max_epochs") == 0 or cfg.trainer.get("max_steps") == 0):
        raise ConfigError(
            "trainer.max_epochs=0 (or max_steps=0) trains nothing, and its record would enter the tables as "
            "a result. To evaluate a checkpoint use `train=false ckpt_path=PATH`; to train, give at least "
            "one epoch."
        )


def check_checkpoint_fits(task: FusionTask, path: str) -> None:
    """A checkpoint evaluated with ``train=false`` must be one of this configuration's models."""
    state = torch.load(path, map_location="cpu", weights_only=False).get("state_dict", {})
    own = {k: v for k, v in task.state_dict().items() if not is_lazy(v)}  # lazy: sized by the first batch
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        example = (
            f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)} there, {tuple(own[wrong[0]].shape)} here"
            if wrong
            else f"{missing[0]} is missing"
        )
        raise ConfigError(
            f"ckpt_path={path} holds another model than this configuration builds ({example}). Evaluate it "
            "with the configuration of the run that made it, e.g. `python train.py "
            "experiment=<its experiment> train=false ckpt_path=...`; that run's .hydra/config.yaml and "
            "overrides.yaml say what it was."
        )


def check_values(cfg: DictConfig) -> None:
    """Values that would fail deep inside torch or a model: each named with what to give instead."""
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise ConfigError(f"seed={cfg.seed!r} must be an integer (e.g. `seed=0`; `sweep=seeds` runs 0-4).")
    for key, low in (("lr", 0.0), ("weight_decay", None), ("momentum", None), ("eps", 0.0)):
        value = cfg.optimizer.get(key) if cfg.get("optimizer") else None
        if value is None:
            continue
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or (value <= low if low is not None else value < 0):
            bound = f"> {low:g}" if low is not None else ">= 0"
            raise ConfigError(
                f"optimizer.{key}={value!r} must be a number {bound} (e.g. `optimizer.lr=1e-3`)."
            )
    for node in ("dataset", "backbone", "fusion"):
        check_types(cfg.get(node), node)


def build(cfg: DictConfig) -> tuple[FusionDataModule, FusionTask]:
    """Datamodule (files checked, data loaded) and the LightningModule."""
    check_values(cfg)
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
        optimizer_groups=OmegaConf.to_container(cfg.optimizer_groups)
        if cfg.get("optimizer_groups")
        else None,
        scheduler_interval=cfg.get("scheduler_interval", "epoch"),
        scheduler_monitor=cfg.get("scheduler_monitor"),
        class_weights=getattr(dm, "class_weights", None),
    )
    return dm, task


def write_predictions(
    cfg: DictConfig, dm: FusionDataModule, task: FusionTask, trainer: pl.Trainer, test_ckpt: str | None
) -> dict[str, Any] | None:
    """A dataset with an unlabeled split to predict (VQA's ``predict_split=test-dev``): the tested weights'
    answers in the official submission format, ``<output_dir>/predictions_<split>.json``; its entry in the
    record. Multi-process runs skip it (say how to predict from their checkpoint in one process)."""
    split = getattr(dm, "predict_split", None)
    if not split or not hasattr(dm, "answers"):
        return None
    if trainer.world_size > 1:  # spawned ranks do not hand their predictions back: one process predicts
        log.warning(
            "dataset.predict_split=%s: predictions are written by single-process runs only; predict from "
            "this run's checkpoint with `train=false ckpt_path=<run>/checkpoints/<best>.ckpt trainer=gpu`.",
            split,
        )
        return {"split": split, "file": None, "skipped": "multi-process run"}
    parts = trainer.predict(task, datamodule=dm, ckpt_path=test_ckpt)
    from fusionbench.data.vqa import write_predictions as write_file

    ids = [int(q) for p in parts for q in p["question_id"].tolist()]
    answers = [dm.answers[i] for p in parts for i in p["index"].tolist()]
    order = sorted(range(len(ids)), key=ids.__getitem__)
    path = write_file(
        Path(cfg.paths.output_dir) / f"predictions_{split}.json",
        [ids[i] for i in order],
        [answers[i] for i in order],
    )
    return {"split": split, "file": path.name, "questions": len(ids)}


def load_tested(task: FusionTask, test_ckpt: str | None) -> None:
    """The tested checkpoint's weights; under ddp_spawn this process's module never saw them."""
    if test_ckpt:
        task.load_state_dict(torch.load(test_ckpt, map_location="cpu", weights_only=False)["state_dict"])


def recover_callback_states(trainer: pl.Trainer, callbacks: list[Any], last_ckpt: Path) -> None:
    """Under ddp_spawn the ranks train in other processes, so this process's callbacks saw no epoch; the
    states of those that add record entries (`EpochLog`'s history, `DEQMonitor`'s solver statistics) come
    back from ``last.ckpt``, which rank 0 wrote at the end of the last epoch."""
    launcher = getattr(trainer.strategy, "launcher", None)
    if getattr(launcher, "_start_method", None) != "spawn" or not last_ckpt.is_file():
        return
    states = torch.load(last_ckpt, map_location="cpu", weights_only=False).get("callbacks") or {}
    for callback in callbacks:
        if hasattr(callback, "record") and callback.state_key in states:
            callback.load_state_dict(states[callback.state_key])


def robustness_curves(cfg: DictConfig, dm: FusionDataModule, task: FusionTask) -> dict[str, Any]:
    """The test split under the `robustness` grid (``task`` holds the tested weights), as few batches per
    point as the trainer's test (``debug=fdr``: one)."""
    from fusionbench.robustness import batch_limit, run_grid

    grid = OmegaConf.to_container(cfg.robustness, resolve=True)
    return run_grid(task, dm, grid, batch_limit(cfg.trainer))


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one experiment; returns (the run record, the objects built). A training run takes its folder's
    lock, skips a finished run of the same configuration, resumes an unfinished one, and refuses either when
    the folder holds another configuration (`fusionbench.run_folder`). An evaluation (``train=false``) writes
    ``evaluation.json``, never the training record."""
    check_trains(cfg)
    check_values(cfg)
    output_dir = Path(cfg.paths.output_dir)
    if not cfg.train:
        if not cfg.get("ckpt_path"):
            raise ConfigError("train=false evaluates a checkpoint: give one with ckpt_path=PATH.")
        return _run(cfg, checked_checkpoint(cfg.ckpt_path), RunRecord(output_dir, EVALUATION_NAME))
    config = hashed_config(cfg)
    record = RunRecord(output_dir)
    with run_lock(output_dir):
        if record.is_complete() and not cfg.get("force", False):
            finished = record.load()
            check_finished(output_dir, finished, config)
            log.info("%s already holds a finished run of this configuration; skipping it.", output_dir)
            return finished, {}
        if cfg.get("force", False):
            record.path.unlink(missing_ok=True)  # replaced: until the new run finishes there is no record
        ckpt_path = resume_from(cfg, output_dir, config)
        write_config_files(output_dir, cfg, hydra_choices(cfg)[1])
        return _run(cfg, ckpt_path, record, config)


def _run(
    cfg: DictConfig, ckpt_path: str | None, record: RunRecord, config: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    start = time.time()
    git = git_state()  # the code this process runs: taken before any later edit of the work tree
    pl.seed_everything(cfg.seed, workers=True)
    dm, task = build(cfg)
    task.attempt_start = start
    if not cfg.train:
        check_checkpoint_fits(task, ckpt_path)
    callbacks = instantiate_all(cfg.get("callbacks"))
    loggers = instantiate_all(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, _convert_="partial"
    )
    facts = {
        # lazy modules (DynMM's gates) have no size before their first batch
        "params": sum(
            p.numel() for p in task.model.parameters() if not isinstance(p, UninitializedParameter)
        ),
        "tags": list(cfg.get("tags") or []),
        "git_sha": git.get("sha"),
        "config_hash": config_hash(config) if config is not None else None,
    }
    for logger in trainer.loggers:  # every logger knows what ran
        logger.log_hyperparams(run_hparams(cfg, facts))

    if cfg.train:
        trainer.fit(task, datamodule=dm, ckpt_path=ckpt_path)
        recover_callback_states(trainer, callbacks, Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        test_ckpt = best or None  # no checkpointing (debug, callbacks=none): the final weights
    else:
        test_ckpt = ckpt_path
    test_metrics = trainer.test(task, datamodule=dm, ckpt_path=test_ckpt)[0] if cfg.test else {}

    predictions = write_predictions(cfg, dm, task, trainer, test_ckpt)
    if (cfg.test or cfg.get("robustness")) and trainer.is_global_zero:
        load_tested(task, test_ckpt)  # what follows looks at the tested weights
    robustness = (
        robustness_curves(cfg, dm, task) if cfg.get("robustness") and trainer.is_global_zero else None
    )
    wall = task.wall_time_s() if cfg.train else time.time() - start  # every attempt of a resumed run
    result = runtime_info(cfg, dm, task, trainer, test_metrics, test_ckpt, wall_time_s=wall, git=git)
    result["tags"] = facts["tags"]
    if config is not None:
        result["config"], result["config_hash"] = config, facts["config_hash"]
    if not cfg.train:
        result["kind"], result["evaluated_checkpoint"] = "evaluation", str(ckpt_path)
    if robustness is not None:
        result["robustness"] = robustness
    if predictions is not None:
        result["predictions"] = predictions
    for callback in callbacks:  # a method's callback adds its entries (DEQ solver convergence, DynMM timing)
        if hasattr(callback, "record"):
            result.update(
                callback.record(task=task, datamodule=dm, tested=bool(cfg.test), test_metrics=test_metrics)
            )
    if trainer.is_global_zero and not (cfg.trainer.get("fast_dev_run") and cfg.train):
        record.write(result)
        summarise(record.path, test_ckpt, result)
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()  # its files written; the next job of a sweep in this process gets a run of its own
    return result, {"datamodule": dm, "task": task, "trainer": trainer}


def summarise(record_path: Path, test_ckpt: str | None, result: dict[str, Any]) -> None:
    """The end-of-run lines: where the record and the tested checkpoint are, and the test metrics."""
    metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.get("metrics", {}).items()) if "/" in k)
    log.info("Run finished in %.0f s. Record: %s", result.get("wall_time_s", 0.0), record_path)
    log.info("Tested checkpoint: %s", test_ckpt or "the final weights (no checkpointing)")
    if metrics:
        log.info("Test: %s", metrics)


def explain(exc: BaseException) -> str | None:
    """The user-facing message of an error we know how to explain, else None."""
    for e in (exc, exc.__cause__, exc.__context__):
        if isinstance(e, FusionbenchError):
            return str(e)
    if isinstance(exc, InstantiationException) and isinstance(exc.__cause__, ImportError):
        return (
            f"Could not build an object from the config: {exc.__cause__}. A package it needs is not "
            'installed: install fusionbench\'s extras (`pip install -e ".[wandb]"`, `[tensorboard]`, '
            "`[slurm]`, `[optuna]`, `[all]`; `make install` installs them all)."
        )
    if isinstance(exc, InstantiationException):
        return (
            f"Could not build an object from the config: {exc}. Check the keys of that config node "
            "(`python train.py --cfg job` prints the composed config)."
        )
    return None


FAILED_NAME = "failed.json"  # a multirun job that failed: its folder says why, and the sweep goes on


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


class FailureSummary(Callback):
    """Hydra callback: after a multirun, name every job of it that failed (their ``failed.json``) and exit
    non-zero, so a sweep goes on past a failed job but never looks like a clean one."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.start = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        root = Path(config.hydra.sweep.dir)
        failed = sorted(p for p in root.rglob(FAILED_NAME) if p.stat().st_mtime >= getattr(self, "start", 0))
        if not failed:
            return
        lines = []
        for path in failed:
            entry = json.loads(path.read_text())
            lines.append(f"  {' '.join(entry.get('overrides', []))}: {entry.get('error')} ({path.parent})")
        message = f"{len(failed)} job(s) of this sweep failed; the others ran:\n" + "\n".join(lines)
        log.error("%s", message)
        print(f"\nfusionbench: {message}", file=sys.stderr)
        sys.exit(1)


@hydra.main(version_base="1.3", config_path=str(ROOT / "configs"), config_name="train")
def main(cfg: DictConfig) -> float | None:
    failed = Path(cfg.paths.output_dir) / FAILED_NAME
    try:
        result, _ = train(cfg)
    except Exception as exc:  # noqa: BLE001 - only known errors are turned into messages
        message = explain(exc)
        if not in_multirun():
            if message is None:
                raise
            log.error("%s", message)
            print(f"\nfusionbench: {message}", file=sys.stderr)
            sys.exit(1)
        # one failed job fails alone: marked failed in its folder, the sweep goes on (FailureSummary)
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
        error = message or f"{type(exc).__name__}: {exc}"
        log.error("Job %s failed: %s", " ".join(overrides), error, exc_info=message is None)
        write_json(failed, {"status": "failed", "error": error, "overrides": overrides})
        return float("nan")  # an Optuna trial that failed (the sweeper counts it against max_failure_rate)
    failed.unlink(missing_ok=True)
    value = (result.get("best_val") or {}).get("value")
    return float("nan") if value is None else value


__all__ = ["build", "build_encoders", "main", "train"]
