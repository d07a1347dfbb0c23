"""A run folder holds one configuration (fusionbench/run_folder.py): skip and resume only what this
configuration made, one process per folder, evaluations beside the training record, corrupt checkpoints moved
aside, one failed multirun job failing alone, and what every logger and the record know about a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST
from omegaconf import OmegaConf

from fusionbench import ROOT
from fusionbench.errors import ConfigError
from fusionbench.run_folder import config_diff, hashed_config, resume_checkpoint, run_lock
from fusionbench.train import train

SYN = ["dataset=synthetic", "fusion=concat", *FAST]


def test_the_hash_ignores_paths_and_display_but_not_what_is_trained(make_cfg, tmp_path):
    a = hashed_config(make_cfg(SYN, sub="a"))
    moved = hashed_config(make_cfg([*SYN, f"paths.data_dir={tmp_path}", "trainer.enable_progress_bar=true"]))
    assert a == moved and "paths" not in a and "logger" not in a
    assert a["callbacks"]["model_checkpoint"]["dirpath"] == "<paths.output_dir>/checkpoints"
    other = hashed_config(make_cfg([*SYN, "trainer.max_epochs=3"], sub="b"))
    assert config_diff(a, other) == ["trainer.max_epochs: 2 -> 3"]


def test_a_finished_run_of_another_configuration_is_not_taken_for_this_one(make_cfg):
    """The issue's case: a table run made with an extra override must not stand for the plain relaunch."""
    short = make_cfg([*SYN, "trainer.max_epochs=1"], sub="seed=0")
    first, _ = train(short)
    assert first["config"]["trainer"]["max_epochs"] == 1 and first["config_hash"]
    config_file = Path(short.paths.output_dir) / ".hydra" / "config.yaml"
    before = config_file.read_text()
    plain = make_cfg([*SYN, "trainer.max_epochs=2"], sub="seed=0")
    with pytest.raises(
        ConfigError,
        match=r"holds a finished run, but it was made with another configuration: "
        r"trainer.max_epochs: 1 -> 2\. Nothing was changed\. .*force=true",
    ):
        train(plain)
    assert config_file.read_text() == before  # the refused relaunch left the finished run's files alone
    again, objs = train(make_cfg([*SYN, "trainer.max_epochs=1"], sub="seed=0"))  # the same configuration
    assert objs == {} and again["metrics"] == first["metrics"]
    plain.force = True
    replaced, _ = train(plain)
    assert replaced["config"]["trainer"]["max_epochs"] == 2 and replaced["epochs_trained"] == 2


def test_an_unfinished_run_of_another_configuration_is_not_resumed(make_cfg):
    cfg = make_cfg([*SYN, "trainer.max_epochs=2"], sub="run")
    train(cfg)
    os.remove(Path(cfg.paths.output_dir) / "metrics.json")  # as if killed before its record
    wider = make_cfg([*SYN, "fusion.head_hidden=[64]"], sub="run")  # would crash with `size mismatch`
    with pytest.raises(ConfigError, match=r"holds an unfinished run \(last.ckpt\), but .*fusion.head_hidden"):
        train(wider)


def test_a_fast_dev_run_leaves_nothing_to_resume(make_cfg):
    smoke = make_cfg([*SYN, "debug=fdr"], sub="seed=0")
    result, _ = train(smoke)
    folder = Path(smoke.paths.output_dir)
    assert result["fast_dev_run"] and not (folder / "metrics.json").exists()
    assert resume_checkpoint(folder) is None and not list(folder.glob("checkpoints/*.ckpt"))
    real, _ = train(make_cfg([*SYN, "trainer.max_epochs=1"], sub="seed=0"))  # the same folder, no refusal
    assert (
        real["status"] == "complete" and real["epochs_trained"] == 1 and (folder / "metrics.json").is_file()
    )


def test_a_second_process_cannot_train_a_locked_folder(make_cfg):
    cfg = make_cfg(SYN, sub="busy")
    with run_lock(Path(cfg.paths.output_dir)):
        with pytest.raises(ConfigError, match=r"is being trained by pid \d+ .* right now"):
            train(cfg)
    train(cfg)  # the lock is released with its holder


def test_an_evaluation_never_replaces_the_training_record(make_cfg):
    cfg = make_cfg([*SYN, "trainer.max_epochs=2"], sub="seed=1")
    trained, objs = train(cfg)
    best = objs["trainer"].checkpoint_callback.best_model_path
    evaluation, _ = train(
        make_cfg([*SYN, "train=false", f"ckpt_path='{best}'"], sub="seed=1")
    )  # quoted: '=' in seed=1
    folder = Path(cfg.paths.output_dir)
    assert json.loads((folder / "metrics.json").read_text())["best_val"] == trained["best_val"]
    written = json.loads((folder / "evaluation.json").read_text())
    assert written["kind"] == "evaluation" and written["metrics"] == evaluation["metrics"]


def test_zero_epochs_write_no_record(make_cfg):
    cfg = make_cfg([*SYN, "trainer.max_epochs=0"])
    with pytest.raises(ConfigError, match=r"trainer.max_epochs=0 .* trains nothing"):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "metrics.json").exists()


def test_a_truncated_last_checkpoint_is_moved_aside_and_the_previous_one_used(make_cfg):
    cfg = make_cfg([*SYN, "trainer.max_epochs=3", "callbacks.early_stopping.patience=100"], sub="disk_full")
    whole, _ = train(
        make_cfg([*SYN, "trainer.max_epochs=3", "callbacks.early_stopping.patience=100"], sub="w")
    )
    train(cfg)
    folder = Path(cfg.paths.output_dir)
    os.remove(folder / "metrics.json")
    last = folder / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # a copy cut short by a full disk
    fallback = resume_checkpoint(folder)
    assert (
        fallback is not None
        and fallback.name.startswith("epoch")
        and (folder / "checkpoints/last.ckpt.corrupt").exists()
    )
    resumed, _ = train(cfg)  # replays the epochs after the best one with the same random draws
    assert resumed["metrics"] == whole["metrics"]


def test_a_truncated_or_foreign_checkpoint_to_evaluate_is_one_paragraph(make_cfg, tmp_path):
    _, objs = train(make_cfg([*SYN, "trainer.max_epochs=1"], sub="fit"))
    best = Path(objs["trainer"].checkpoint_callback.best_model_path)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(best.read_bytes()[:500])
    with pytest.raises(ConfigError, match=r"does not load \(truncated or not a checkpoint"):
        train(make_cfg([*SYN, "train=false", f"ckpt_path={cut}"], sub="e1"))
    with pytest.raises(ConfigError, match=r"holds another model than this configuration builds .* shape"):
        train(make_cfg([*SYN, "fusion.head_hidden=[64]", "train=false", f"ckpt_path={best}"], sub="e2"))


def test_the_record_and_every_logger_know_what_ran(make_cfg):
    cfg = make_cfg([*SYN, "logger=csv", "tags=[probe,t1]"], sub="logged")
    record, _ = train(cfg)
    assert record["tags"] == ["probe", "t1"] and len(record["config_hash"]) == 16
    hparams = OmegaConf.load(Path(cfg.paths.output_dir) / "csv" / "hparams.yaml")
    assert hparams.fusion._target_.endswith("ConcatFusion") and hparams.run.tags == ["probe", "t1"]
    assert (
        hparams.run.params == record["params"]["total"] and hparams.run.config_hash == record["config_hash"]
    )


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0", **(env or {})},
        timeout=300,
    )


def test_one_failed_job_fails_alone_and_the_sweep_says_so(tmp_path):
    r = run_cli(
        "-m",
        "dataset=synthetic",
        "fusion=concat",
        "optimizer.lr=1e30,1e-3",
        "trainer.max_epochs=2",
        "logger=none",
        "trainer.enable_progress_bar=false",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert r.returncode == 1
    assert (tmp_path / "1" / "metrics.json").exists()  # the job after the failed one ran
    failed = json.loads((tmp_path / "0" / "failed.json").read_text())
    assert "optimizer.lr=1e+30" in failed["overrides"] and "became nan" in failed["error"]
    assert "1 job(s) of this sweep failed; the others ran" in r.stderr and "optimizer.lr=1e+30" in r.stderr


def kill_and_resume(tmp_path: Path, args: list[str]) -> tuple[dict, dict, int]:
    """The run uninterrupted (``whole``), then killed with SIGKILL after epoch 1's checkpoint and relaunched
    with the same command (``split``); returns both records and the killed process's exit code."""
    whole = run_cli(*args, f"hydra.run.dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-2000:]
    kill = {"FUSIONBENCH_KILL_AFTER_EPOCH": "1", "FUSIONBENCH_KILL_SIGNAL": "KILL"}
    killed = run_cli(*args, f"hydra.run.dir={tmp_path / 'split'}", env=kill)
    assert not (tmp_path / "split" / "metrics.json").exists()  # no record of half a run
    resumed = run_cli(*args, f"hydra.run.dir={tmp_path / 'split'}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("whole", "split"))
    return a, b, killed.returncode


# three processes, 30 s: slow; tests/test_train.py interrupts a run in-process (SIGINT) in the fast suite
@pytest.mark.slow
def test_a_run_killed_mid_training_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL after epoch 1's checkpoint (as a crash or an out-of-memory kill), then the same command."""
    args = [
        "dataset=synthetic",
        "fusion=deq",
        "seed=3",
        "trainer.max_epochs=4",
        "logger=csv",
        "callbacks.early_stopping.patience=100",
        "trainer.enable_progress_bar=false",
    ]
    a, b, killed = kill_and_resume(tmp_path, args)
    assert killed == -9 and a["metrics"] == b["metrics"] and a["best_val"] == b["best_val"]
    assert b["wall_time_s"] >= 0.8 * a["wall_time_s"] - 5  # both attempts counted, not just the last
    log = (tmp_path / "split" / "train.log").read_text()
    assert "Resuming from" in log and log.count("epoch 0/4") == 1  # the log of both attempts, appended


@pytest.mark.parametrize("dataset, direction", [("avmnist", "maximize"), ("rosmap", "minimize")])
def test_the_optuna_search_direction_follows_the_monitored_metric(dataset, direction):
    from conftest import compose_cfg
    from hydra.core.hydra_config import HydraConfig

    cfg = compose_cfg(["hparams_search=optuna", f"dataset={dataset}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    assert cfg.hydra.sweeper.direction == direction and cfg.hydra.sweeper.max_failure_rate > 0
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")


def test_an_optuna_study_runs_its_trials(tmp_path):
    r = run_cli(
        "-m",
        "hparams_search=optuna",
        "dataset=synthetic",
        "fusion=concat",
        "hydra.sweeper.n_trials=2",
        "trainer.max_epochs=1",
        "logger=none",
        "trainer.enable_progress_bar=false",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    best = OmegaConf.load(tmp_path / "optimization_results.yaml")
    assert set(best.best_params) == {"optimizer.lr", "optimizer.weight_decay"} and best.best_value > 0


def test_tensorboard_and_wandb_get_the_hyper_parameters_too(make_cfg):
    """The same facts as the CSV logger's hparams.yaml reach TensorBoard's hparams and wandb's run config."""
    cfg = make_cfg([*SYN, "logger=tensorboard", "tags=[tb]"], sub="tb")
    record, _ = train(cfg)
    hparams = OmegaConf.load(Path(cfg.paths.output_dir) / "tensorboard" / "hparams.yaml")
    assert hparams.run.config_hash == record["config_hash"] and hparams.run.tags == ["tb"]
    os.environ.setdefault("WANDB_MODE", "offline")
    cfg = make_cfg([*SYN, "logger=wandb", "tags=[wb]"], sub="wb")
    record, _ = train(cfg)
    # an offline run keeps its config in the run's transaction log, which `wandb sync` uploads; wandb's
    # service process writes it, and under load it can land after wandb.finish() returns (seen in CI)
    (log,) = Path(cfg.paths.output_dir, "wandb").glob("offline-run-*/run-*.wandb")
    deadline = time.time() + 60
    while record["config_hash"].encode() not in log.read_bytes() and time.time() < deadline:
        time.sleep(0.5)
    data = log.read_bytes()
    assert record["config_hash"].encode() in data and b"ConcatFusion" in data


@pytest.mark.slow  # six spawned processes, about a minute
def test_a_ddp_sim_run_killed_mid_training_resumes_to_the_uninterrupted_result(tmp_path):
    """The same under `trainer=ddp_sim` (two CPU processes): a rank killed after epoch 1, then a relaunch."""
    args = [
        "dataset=synthetic",
        "fusion=concat",
        "seed=2",
        "trainer=ddp_sim",
        "trainer.max_epochs=3",
        "logger=csv",
        "callbacks.early_stopping.patience=100",
        "trainer.enable_progress_bar=false",
    ]
    a, b, killed = kill_and_resume(tmp_path, args)
    assert killed != 0 and a["metrics"] == b["metrics"] and a["best_val"] == b["best_val"]
    assert (
        b["best_val"]["value"] is not None
    )  # read from last.ckpt: the spawned processes do not hand it back
    history = (tmp_path / "split" / "csv" / "metrics.csv").read_text()
    # the epochs of both attempts are kept, not only the test row
    assert "train/loss" in history.splitlines()[0] and history.count("\n") > 3


def test_a_record_from_before_config_hashes_is_kept_with_a_warning(make_cfg, caplog):
    """Committed records predate config hashes (and renamed targets): kept, with what differs said."""
    import logging

    cfg = make_cfg([*SYN, "trainer.max_epochs=1"], sub="legacy")
    train(cfg)
    folder = Path(cfg.paths.output_dir)
    record = json.loads((folder / "metrics.json").read_text())
    del record["config"], record["config_hash"]  # as written before issue 14
    (folder / "metrics.json").write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="fusionbench"):
        again, objs = train(make_cfg([*SYN, "trainer.max_epochs=2"], sub="legacy"))
    assert objs == {} and again == record
    assert (
        "recorded before configurations were hashed" in caplog.text
        and "trainer.max_epochs: 1 -> 2" in caplog.text
    )
