"""Reloading a finished run (`fusionbench.runs`): the config it ran with, the checkpoint it was tested with,
and errors that say what is missing."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FAST
from omegaconf import OmegaConf

from fusionbench import ROOT
from fusionbench.errors import ConfigError
from fusionbench.runs import checkpoint_state, load_run, run_config, selected_checkpoint
from fusionbench.train import train


def test_load_run_restores_the_tested_checkpoint(make_cfg):
    cfg = make_cfg([*FAST, "fusion=concat", "trainer.max_epochs=3"])
    result, _ = train(cfg)
    run = Path(cfg.paths.output_dir)
    assert (
        OmegaConf.load(run / ".hydra" / "config.yaml") == cfg
    )  # written by the run (fusionbench.run_folder)
    ckpt = selected_checkpoint(run)
    assert ckpt.name == result["test_checkpoint"] and ckpt.parent == run / "checkpoints"
    loaded_cfg, dm, task = load_run(run, {"dataset.batch_size": 7})
    assert loaded_cfg.dataset.batch_size == 7 and loaded_cfg.paths.output_dir == str(run)
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert saved.keys() == task.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in task.state_dict().items())


def test_missing_pieces_are_explained(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"is not a run folder \(no .hydra/config.yaml\)"):
        run_config(tmp_path / "nowhere")
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    with pytest.raises(ConfigError, match="holds no epoch"):  # checkpoints are not committed with records
        selected_checkpoint(tmp_path / "run")
    torch.save({"state_dict": {"w": torch.ones(2)}}, folder / "epoch001.ckpt")
    shutil.copy(folder / "epoch001.ckpt", folder / "epoch002.ckpt")
    with pytest.raises(
        ConfigError, match=r"holds \['epoch001.ckpt', 'epoch002.ckpt'\]; expected the one selected"
    ):
        selected_checkpoint(tmp_path / "run")
    with pytest.raises(ConfigError, match="matches 2 files"):
        checkpoint_state(folder / "epoch*.ckpt")
    assert torch.equal(checkpoint_state(folder / "epoch001.ckpt")["w"], torch.ones(2))
    torch.save([1, 2], folder / "list.ckpt")
    with pytest.raises(ConfigError, match="holds no state_dict"):
        checkpoint_state(folder / "list.ckpt")


def _test_epochs_script():
    spec = importlib.util.spec_from_file_location("test_epochs", ROOT / "scripts" / "test_epochs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_epoch_is_tested_and_the_selected_one_matches_the_run(make_cfg):
    cfg = make_cfg(
        [*FAST, "fusion=concat", "trainer.max_epochs=3", "callbacks.model_checkpoint.save_top_k=-1"]
    )
    result, _ = train(cfg)
    run = Path(cfg.paths.output_dir)
    tested = _test_epochs_script().evaluate_epochs(run)
    assert list(tested) == ["epoch000.ckpt", "epoch001.ckpt", "epoch002.ckpt"]
    # the checkpoint the run tested gives the run's own test metrics again
    again = tested[result["test_checkpoint"]]
    assert again["test/acc"] == pytest.approx(result["metrics"]["test/acc"], abs=1e-6)
    assert again["test/loss"] == pytest.approx(result["metrics"]["test/loss"], rel=1e-5)
    assert len({round(m["test/loss"], 6) for m in tested.values()}) == 3  # three different weights
    assert json.loads((run / "epoch_tests.json").read_text()) == tested


def test_epochs_without_checkpoints_say_how_to_keep_them(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ConfigError, match="save_top_k=-1"):
        _test_epochs_script().evaluate_epochs(tmp_path)
