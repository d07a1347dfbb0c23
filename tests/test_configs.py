"""Every config group option composes and instantiates; the CLI explains bad input (experiments:
test_experiments.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import RGBD_FUSIONS, compose_cfg, token_aware
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fusionbench import ROOT
from fusionbench.errors import ConfigError
from fusionbench.train import build, build_encoders

CONFIGS = ROOT / "configs"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def test_default_composition_is_rosmap_deq_fusion():
    cfg = compose_cfg([])
    assert cfg.dataset.name == "rosmap"
    assert sorted(cfg.backbone) == ["meth", "mirna", "mrna"]
    assert cfg.fusion._target_.endswith("DEQFusion")
    assert cfg.seed == 0 and cfg.train is True


@pytest.mark.parametrize("dataset", options("dataset"))
def test_backbone_follows_dataset(dataset):
    cfg = compose_cfg([f"dataset={dataset}"])
    dm = instantiate(cfg.dataset, _convert_="all")
    named = sorted(k for k in cfg.backbone if k != "_default_")
    # every modality has an encoder: its own entry, or the backbone's `_default_` (stocks: one per ticker)
    assert named == sorted(dm.modalities) or (named == [] and "_default_" in cfg.backbone)


def test_backbone_override_still_wins_and_mismatch_is_explained():
    cfg = compose_cfg(["dataset=synthetic", "backbone=rosmap"])
    assert sorted(cfg.backbone) == ["meth", "mirna", "mrna"]
    dm = instantiate(cfg.dataset, _convert_="all")
    dm.setup()
    with pytest.raises(
        ConfigError, match=r"modalities \['audio', 'image', 'text'\].*missing \['audio', 'image', 'text'\]"
    ):
        build_encoders(cfg.backbone, dm)


def test_default_encoder_serves_every_unnamed_modality():
    cfg = compose_cfg(
        [
            "dataset=synthetic",
            "backbone=rosmap",
            "+backbone._default_={_target_: fusionbench.encoders.MLPEncoder, hidden_dims: [7]}",
            "+backbone.text={_target_: fusionbench.encoders.MLPEncoder, hidden_dims: [3]}",
        ]
    )
    dm = instantiate(cfg.dataset, _convert_="all")
    dm.setup()
    encoders = build_encoders(cfg.backbone, dm)
    assert sorted(encoders) == [
        "audio",
        "image",
        "text",
    ]  # the rosmap views are not this dataset's: not built
    assert (encoders["audio"].output_dim, encoders["image"].output_dim, encoders["text"].output_dim) == (
        7,
        7,
        3,
    )
    assert encoders["audio"] is not encoders["image"]  # one encoder per modality, not one shared


def test_explicit_input_dim_must_match_the_data():
    cfg = compose_cfg(["dataset=synthetic", "+backbone.text.input_dim=99"])
    dm = instantiate(cfg.dataset, _convert_="all")
    dm.setup()
    with pytest.raises(ConfigError, match="backbone.text.input_dim=99 but dataset 'synthetic' has 10"):
        build_encoders(cfg.backbone, dm)


@pytest.mark.parametrize("fusion", token_aware(options("fusion")))
def test_every_fusion_builds_on_synthetic(fusion):
    extra = ["dataset.modalities=[text]"] if fusion == "unimodal" else []
    if fusion == "mi_matrix":  # a bilinear map of exactly two modalities
        extra = ["dataset.modalities=[image,text]"]
    if fusion.startswith("early_sequence") or fusion.startswith(
        "mult"
    ):  # stacks equal-length series (B, T, 1) along the feature axis
        extra = ["dataset.shapes={audio: [12, 1], image: [12, 1], text: [12, 1]}"]
    if fusion == "mfas":  # fuses intermediate LeNet layers: AV-MNIST-shaped data, LeNet backbone
        extra = [
            "dataset.shapes={audio: [1, 112, 112], image: [1, 28, 28]}",
            "dataset.modalities=[audio,image]",
            "backbone=avmnist",
        ]
    if fusion in RGBD_FUSIONS:  # per-pixel logits for RGB-D images
        cfg = compose_cfg(
            ["dataset=rgbd_synthetic", f"fusion={fusion}", "dataset.num_samples={train: 4, val: 2, test: 2}"]
        )
        dm, task = build(cfg)
        out = task(next(iter(dm.train_dataloader()))["inputs"])
        assert out.logits.shape == (4, 7, 96, 96)
        return
    cfg = compose_cfg(["dataset=synthetic", f"fusion={fusion}", *extra])
    dm, task = build(cfg)
    batch = next(iter(dm.train_dataloader()))
    out = task(batch["inputs"])
    assert out.logits.shape == (32, 3)


@pytest.mark.parametrize("optimizer", options("optimizer"))
def test_every_optimizer_instantiates(optimizer):
    cfg = compose_cfg([f"optimizer={optimizer}"])
    opt = instantiate(cfg.optimizer)(params=[torch.nn.Parameter(torch.zeros(2))])
    assert opt.param_groups[0]["lr"] == cfg.optimizer.lr


@pytest.mark.parametrize("trainer", options("trainer"))
def test_every_trainer_composes(trainer, tmp_path):
    cfg = compose_cfg([f"trainer={trainer}"], tmp_path)
    expected = {"cpu": "cpu", "default": "cpu", "ddp_sim": "cpu", "gpu": "gpu", "ddp": "gpu"}[trainer]
    assert cfg.trainer.accelerator == expected
    if expected == "cpu":  # GPU trainers can only be built where a GPU is
        t = instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
        assert t.max_epochs == cfg.trainer.max_epochs
        if trainer == "ddp_sim":
            assert t.num_devices == 2 and type(t.strategy).__name__ == "DDPStrategy"
    if trainer == "ddp":
        assert cfg.trainer.strategy == "ddp" and cfg.trainer.sync_batchnorm


@pytest.mark.parametrize("logger", options("logger"))
def test_every_logger_instantiates(logger, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = compose_cfg([f"logger={logger}"], tmp_path)
    built = [instantiate(c) for c in (cfg.logger or {}).values()]
    assert len(built) == (0 if logger == "none" else 1)
    if logger == "wandb":
        assert cfg.logger.wandb.mode == "offline"  # never uploads unless the user asks
        monkeypatch.setenv("WANDB_MODE", "")
        assert compose_cfg(["logger=wandb"], tmp_path).logger.wandb.mode == "offline"
        monkeypatch.setenv("WANDB_MODE", "online")
        assert compose_cfg(["logger=wandb"], tmp_path).logger.wandb.mode == "online"


@pytest.mark.parametrize("callbacks", options("callbacks"))
def test_callbacks_follow_the_dataset_monitor(callbacks, tmp_path):
    cfg = compose_cfg(
        [
            f"callbacks={callbacks}",
            "dataset=synthetic",
            "dataset.monitor.metric=val/acc",
            "dataset.monitor.mode=max",
        ],
        tmp_path,
    )
    built = [instantiate(c) for c in (cfg.callbacks or {}).values()]
    monitored = [cb for cb in built if hasattr(cb, "monitor")]
    assert [cb.monitor for cb in monitored] == ["val/acc"] * (2 if callbacks == "default" else 0)


@pytest.mark.parametrize("debug", options("debug"))
def test_debug_configs(debug):
    cfg = compose_cfg([f"debug={debug}"])
    assert cfg.trainer.accelerator == "cpu" and not cfg.logger
    if debug == "fdr":
        assert cfg.trainer.fast_dev_run is True


def test_slurm_launcher_and_seed_sweep_compose():
    cfg = compose_cfg(["launcher=slurm", "sweep=seeds"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.trainer.accelerator == "gpu"
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.hydra.sweeper.params.seed == "range(0,5)"
    assert (
        OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["subdir"] == "${experiment_name}/seed=${seed}"
    )


def test_multinode_slurm_launcher_follows_the_trainer():
    """launcher=slurm_ddp: one job whose SLURM tasks are the DDP processes (one per GPU on every node)."""
    cfg = compose_cfg(
        ["launcher=slurm_ddp", "trainer.devices=4", "trainer.num_nodes=2"], return_hydra_config=True
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.max_num_timeout == 3
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.precision == "bf16-mixed"


def run_cli(*args: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args, "logger=none", f"hydra.run.dir={tmp_path}/run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_cli_unknown_option_lists_choices(tmp_path):
    r = run_cli("fusion=nope", tmp_path=tmp_path)
    assert r.returncode == 1
    assert "Could not find 'fusion/nope'" in r.stderr and "concat" in r.stderr


def test_cli_unknown_key_fails(tmp_path):
    r = run_cli("fusion.n_iters=3", tmp_path=tmp_path)
    assert r.returncode == 1 and "n_iters" in r.stderr and "not in struct" in r.stderr
    r = run_cli("+fusion.n_iters=3", "dataset=synthetic", tmp_path=tmp_path)
    assert r.returncode == 1
    assert "fusionbench: Could not build an object from the config" in r.stderr and "n_iters" in r.stderr
    assert "Traceback" not in r.stderr
