"""Shared fixtures: compose the real configs (as `python train.py` does) and write dataset fixtures
in their real on-disk formats."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

import fusionbench.train  # noqa: F401  (registers the fb.root resolver)
from fusionbench import ROOT
from fusionbench.data.mogonet import MogonetDataModule

CONFIG_DIR = str(ROOT / "configs")

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs 2 workers on 2 cores: one thread each, not 2 x 2
    os.environ["OMP_NUM_THREADS"] = "1"  # also for the runs tests start as subprocesses
    torch.set_num_threads(1)

# Fusions that read token-level text (a pretrained language model's hidden states, VQA question ids) and
# word-aligned or region features: the synthetic dataset has none; each is trained end to end on its own
# dataset's fixture in its test file.
TOKEN_FUSIONS = {
    "cmbert": "test_cmbert.py",
    "cmbert_deq": "test_cmbert.py",
    "mag": "test_mag.py",
    "mmim": "test_mmim.py",
    "mcan": "test_mcan.py",
    "mcan_deq": "test_mcan.py",
    "mutan": "test_mutan.py",
    "mutan_deq": "test_mutan.py",
}


# Segmentation models of RGB-D images: built and trained on dataset=rgbd_synthetic, not dataset=synthetic.
RGBD_FUSIONS = ("esanet", "dynmm_esanet")


def token_aware(fusions: list[str]) -> list:
    """``fusions`` with the token-level ones marked skipped on synthetic data (and where they are tested)."""
    return [
        pytest.param(
            f,
            marks=pytest.mark.skip(
                reason=f"token-level fusion: trained on its fixture in {TOKEN_FUSIONS[f]}"
            ),
        )
        if f in TOKEN_FUSIONS
        else f
        for f in fusions
    ]


# Fast settings for runs inside tests: CPU, tiny epochs, no progress bar, no logger.
FAST = ["trainer.enable_progress_bar=false", "logger=none", "trainer.max_epochs=2"]


def compose_cfg(
    overrides: list[str], output_dir: Path | None = None, return_hydra_config: bool = False
) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=return_hydra_config)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    """`make_cfg(overrides)` -> composed config writing into a fresh tmp folder."""

    def _make(overrides: list[str] = (), sub: str = "run") -> DictConfig:
        return compose_cfg(list(overrides), tmp_path / sub)

    return _make


def write_mogonet_fixture(
    folder: Path, n_tr: int = 40, n_te: int = 20, dims=(6, 5, 4), num_classes: int = 3, seed: int = 0
):
    """A KB-sized dataset in exact MOGONET layout with a learnable signal in every view."""
    rng = np.random.default_rng(seed)
    y_tr = np.arange(n_tr) % num_classes
    y_te = np.arange(n_te) % num_classes
    views = {}
    for v, d in enumerate(dims, start=1):
        centers = rng.normal(size=(num_classes, d))
        views[v] = tuple(centers[y] + 0.3 * rng.normal(size=(len(y), d)) for y in (y_tr, y_te))
    MogonetDataModule.write(folder, views, (y_tr, y_te))
    return folder


@pytest.fixture
def mogonet_dir(tmp_path) -> Path:
    return write_mogonet_fixture(tmp_path / "mogonet")


def mogonet_kwargs(folder: Path, **over) -> dict:
    kw = dict(
        name="fixture",
        data_dir=folder,
        views={"mrna": 1, "meth": 2, "mirna": 3},
        num_classes=3,
        feature_dims={"mrna": 6, "meth": 5, "mirna": 4},
        num_samples={"train": 40, "test": 20},
        val_fraction=0.25,
        batch_size=16,
    )
    kw.update(over)
    return kw
