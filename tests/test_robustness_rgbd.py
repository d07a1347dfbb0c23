"""DynMM's RGB-D robustness protocol in the robustness grids: the mean-|x| Gaussian noise, the share of
corrupted samples (``probability``) and the ``either`` scope's split, determinism per seed and independence
from the batch size, the mean and std over ``seeds`` in the record, and a whole grid on a tiny segmentation
datamodule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from fusionbench import ROOT
from fusionbench.data.base import FusionDataModule, TensorDictDataset
from fusionbench.errors import ConfigError
from fusionbench.fusion.base import FusionOutput
from fusionbench.robustness import Corruption, check_grid, evaluate, mean_abs_noise, run_grid


def test_mean_abs_noise_scales_with_the_samples_mean_magnitude():
    g = torch.Generator().manual_seed(0)
    x = 2.0 * torch.sign(torch.randn(200_000, generator=g))  # mean |x| = 2
    noisy = mean_abs_noise(x, 0.5, g)
    assert abs((noisy - x).std().item() - 1.0) < 0.01 and abs((noisy - x).mean().item()) < 0.01
    # per sample: a sample with 3x the magnitude gets 3x the noise
    c = Corruption(["gaussian_mean_abs"], 0.4, ["rgb"])
    small, big = torch.full((3, 64, 64), -1.0), torch.full((3, 64, 64), 3.0)
    assert (c({"rgb": small}, 0)["rgb"] - small).std().item() == pytest.approx(0.4, rel=0.03)
    assert (c({"rgb": big}, 0)["rgb"] - big).std().item() == pytest.approx(1.2, rel=0.03)


def shares(c: Corruption, n: int = 6000) -> dict[str, float]:
    """Share of samples whose rgb only, depth only, both or none changed."""
    x = {"depth": torch.ones(1, 2, 2), "rgb": torch.ones(3, 2, 2)}
    counts = {"rgb": 0, "depth": 0, "both": 0, "none": 0}
    for i in range(n):
        out = c(x, i)
        hit = [m for m in ("depth", "rgb") if not torch.equal(out[m], x[m])]
        counts["both" if len(hit) == 2 else hit[0] if hit else "none"] += 1
    return {k: v / n for k, v in counts.items()}


def test_probability_and_the_either_scope_split_the_samples_as_the_public_modes():
    one = shares(Corruption(["gaussian_mean_abs"], 0.5, ["rgb"], probability=0.33))  # --mode 0
    assert one["rgb"] == pytest.approx(0.33, abs=0.02) and one["depth"] == one["both"] == 0.0
    together = shares(Corruption(["gaussian_mean_abs"], 0.5, ["depth", "rgb"], probability=0.33))
    assert together["both"] == pytest.approx(0.33, abs=0.02) and together["rgb"] == together["depth"] == 0.0
    either = shares(Corruption(["gaussian_mean_abs"], 0.5, ["rgb", "depth"], probability=0.33, either=True))
    assert either["both"] == 0.0  # --mode 2: one modality or none
    assert either["rgb"] == pytest.approx(0.33, abs=0.02) and either["depth"] == pytest.approx(0.33, abs=0.02)
    assert either["none"] == pytest.approx(0.34, abs=0.02)
    # the draw u picks the i-th modality in sorted order when 0.33 i <= u < 0.33 (i + 1)
    c = Corruption(["white"], 0.5, ["rgb", "depth"], probability=0.33, either=True)
    assert c.chosen(0.1) == ["depth"] and c.chosen(0.5) == ["rgb"] and c.chosen(0.7) == []
    assert shares(Corruption(["white"], 0.5, ["rgb"]), 200)["rgb"] == 1.0  # default: every sample


def test_the_draws_are_fixed_by_seed_and_sample():
    x = {"depth": torch.randn(1, 4, 4), "rgb": torch.randn(3, 4, 4)}
    c = Corruption(["gaussian_mean_abs"], 0.7, ["depth", "rgb"], seed=5, probability=0.33, either=True)
    outs = [c(x, i) for i in range(40)]
    assert all(torch.equal(c(x, i)["rgb"], outs[i]["rgb"]) for i in range(40))
    other = Corruption(["gaussian_mean_abs"], 0.7, ["depth", "rgb"], seed=6, probability=0.33, either=True)
    assert any(not torch.equal(other(x, i)["rgb"], outs[i]["rgb"]) for i in range(40))


@pytest.mark.parametrize(
    "grid, match",
    [
        ({"scopes": ["either"]}, "must not exceed 1"),  # probability 1 on two modalities
        ({"probability": 0.0}, r"\(0, 1\]"),
        ({"seeds": []}, "non-empty"),
        ({"seeds": [1, 1]}, "distinct"),
        ({"seeds": [0, 1], "seed": 3}, "not both"),
    ],
)
def test_bad_rgbd_grids_are_explained(grid, match):
    with pytest.raises(ConfigError, match=match):
        check_grid({"levels": [0.0, 0.5], "noise": ["gaussian_mean_abs"], **grid}, ["depth", "rgb"])


def test_the_shipped_rgbd_grid_is_the_public_protocol():
    grid = OmegaConf.load(ROOT / "configs" / "robustness" / "rgbd.yaml")
    spec = check_grid(grid, ["depth", "rgb"])
    assert spec["levels"] == pytest.approx([i / 10 for i in range(11)])
    assert spec["noise"] == ["gaussian_mean_abs"] and spec["probability"] == 0.33
    assert spec["scopes"] == ["rgb", "depth", "either"] and spec["seeds"] == list(range(10))
    assert spec["seed"] == 0 and spec["batch_size"] == 8


# -- a tiny segmentation datamodule ------------------------------------------------------------------


class SumSign(nn.Module):
    """Per pixel: class 1 where depth + rgb[0] > 0, else 0 (the exact labels of `TinySeg`)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, inputs):
        s = self.scale * (inputs["depth"] + inputs["rgb"][:, :1])
        return FusionOutput(torch.cat([-s, s], 1), None, {})


class TinySeg(FusionDataModule):
    task_type, num_outputs = "segmentation", 2

    def __init__(self, n: int = 24, size: int = 8) -> None:
        super().__init__(name="tinyseg", data_dir=".")
        g = torch.Generator().manual_seed(0)
        rgb, depth = torch.randn(n, 3, size, size, generator=g), torch.randn(n, 1, size, size, generator=g)
        target = ((depth + rgb[:, :1])[:, 0] > 0).long()
        target[:, 0, :] = -1  # a void row
        self.modalities = ["depth", "rgb"]
        self.test_set = TensorDictDataset({"depth": depth, "rgb": rgb}, target)


class Task:
    def __init__(self, model: nn.Module) -> None:
        self.model, self.task_type = model, "segmentation"


GRID = {
    "levels": [0.0, 0.5, 1.0],
    "noise": ["gaussian_mean_abs"],
    "probability": 0.33,
    "scopes": ["rgb", "depth", "either"],
}


def test_a_grid_over_a_segmentation_datamodule_with_seeds():
    dm, task = TinySeg(), Task(SumSign())
    clean = evaluate(task.model, dm.test_set, "segmentation", 2, 5)
    assert clean == {"macc": 1.0, "miou": 1.0, "pixel_acc": 1.0}
    rob = run_grid(task, dm, {**GRID, "seeds": [0, 1, 2], "batch_size": 5})
    assert rob["seeds"] == [0, 1, 2] and rob["seed"] == 0 and rob["probability"] == 0.33
    assert set(rob["curves"]) == {"rgb", "depth", "either"}
    assert rob["curves"]["either"]["modalities"] == ["depth", "rgb"]
    for curve in rob["curves"].values():
        assert set(curve) == {"modalities", "metrics", "std", "per_seed", "auc"}
        assert set(curve["metrics"]) == {"macc", "miou", "pixel_acc"}
        runs = np.asarray(curve["per_seed"]["miou"])  # (levels, seeds)
        assert runs.shape == (3, 3) and (runs[0] == 1.0).all()  # level 0: the clean split for every seed
        assert curve["metrics"]["miou"] == pytest.approx(runs.mean(1).tolist())
        assert curve["std"]["miou"] == pytest.approx(runs.std(1).tolist())  # population std (np.std)
        assert curve["std"]["miou"][0] == 0.0 and curve["std"]["miou"][2] > 0  # seeds corrupt differently
        assert curve["metrics"]["pixel_acc"][2] < curve["metrics"]["pixel_acc"][1] < 1.0
        assert curve["metrics"]["pixel_acc"][2] > 0.5  # two thirds of the samples stay clean
    # a single seed of the list reproduces that seed's column, whatever the batch size
    one = run_grid(task, dm, {**GRID, "seed": 1, "batch_size": 7})
    assert "std" not in one["curves"]["rgb"] and "seeds" not in one
    for scope, curve in rob["curves"].items():
        assert one["curves"][scope]["metrics"]["miou"] == [r[1] for r in curve["per_seed"]["miou"]]


def test_plain_grids_keep_their_record_shape():
    dm, task = TinySeg(), Task(SumSign())
    rob = run_grid(task, dm, {"levels": [0.0, 0.5], "noise": ["white"], "scopes": ["all", "each"]})
    assert set(rob) == {
        "levels",
        "noise",
        "scopes",
        "seed",
        "batch_size",
        "name",
        "scales",
        "curves",
        "wall_time_s",
    }
    assert all(set(c) == {"modalities", "metrics", "auc"} for c in rob["curves"].values())
    # without `probability` every sample is corrupted: white noise of std 0.5 on both inputs flips pixels
    assert rob["curves"]["all"]["metrics"]["pixel_acc"][1] < 0.9
