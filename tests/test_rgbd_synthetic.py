"""The synthetic RGB-D segmentation data: the batch contract, the cue that makes depth necessary in dark
scenes only, void outlines, seeding, class weights and errors."""

from __future__ import annotations

import pytest
import torch

from fusionbench.data import RGBDSyntheticDataModule
from fusionbench.data.rgbd_synthetic import FAR, NEAR
from fusionbench.errors import DatasetError

SIZES = {"train": 40, "val": 8, "test": 20}


def module(**kw) -> RGBDSyntheticDataModule:
    dm = RGBDSyntheticDataModule(
        num_samples=SIZES, seed=kw.pop("seed", 0), depth_noise=0.0, noise=0.0, batch_size=16, **kw
    )
    dm.setup("fit")
    return dm


def raw(dm: RGBDSyntheticDataModule, split: str = "train") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rgb in [0, 1], depth in [0, 1], target) of a split, normalisation undone."""
    ds = getattr(dm, f"{split}_set")
    d_mean, d_std = dm.depth_stats
    return ds.inputs["rgb"] * 0.25 + 0.5, ds.inputs["depth"][:, 0] * d_std + d_mean, ds.target


def test_batch_contract_and_sizes():
    dm = module()
    batch = next(iter(dm.train_dataloader()))
    assert batch["inputs"]["rgb"].shape == (16, 3, 96, 96) and batch["inputs"]["depth"].shape == (
        16,
        1,
        96,
        96,
    )
    assert batch["target"].shape == (16, 96, 96) and batch["target"].dtype == torch.long
    assert set(batch["target"].unique().tolist()) <= set(range(-1, 7)) and -1 in batch["target"].unique()
    assert (
        dm.task_type == "segmentation"
        and dm.num_outputs == 7
        and dm.input_dims == {"depth": 96 * 96, "rgb": 3 * 96 * 96}
    )
    assert {k: len(getattr(dm, f"{k}_set")) for k in SIZES} == SIZES
    depth = dm.train_set.inputs["depth"]
    assert abs(float(depth.mean())) < 1e-4 and abs(float(depth.std()) - 1.0) < 1e-3  # training statistics


def test_dark_scenes_pair_colours_and_separate_them_by_depth():
    dm = module(dark_fraction=1.0)
    rgb, depth, target = raw(dm)
    for a, b in ((1, 2), (3, 4), (5, 6)):  # pairs share a colour (jitter 0.05) but stand near / far
        ca = rgb.permute(0, 2, 3, 1)[target == a].mean(0)
        cb = rgb.permute(0, 2, 3, 1)[target == b].mean(0)
        assert (ca - cb).abs().max() < 0.05
        assert depth[target == a].allclose(torch.tensor(NEAR), atol=1e-5)
        assert depth[target == b].allclose(torch.tensor(FAR), atol=1e-5)
    lit_rgb, lit_depth, lit_target = raw(module(dark_fraction=0.0))
    colours = torch.stack([lit_rgb.permute(0, 2, 3, 1)[lit_target == c].mean(0) for c in range(1, 7)])
    assert torch.cdist(colours, colours).add(torch.eye(6)).min() > 0.2  # lit: every class its own colour
    near = lit_depth[lit_target == 1]
    assert near.std() > 0.05  # lit: depth does not give the class
    assert float(rgb.mean()) < 0.5 * float(lit_rgb.mean())  # dark scenes are visibly darker (the gate's cue)


def test_void_outlines_and_meta():
    dm = module()
    item = dm.test_set[0]
    assert set(item) == {"inputs", "target", "meta"} and item["meta"]["dark"].item() in (0, 1)
    void = (dm.train_set.target == -1).float().mean()
    assert 0.005 < float(void) < 0.15
    assert float(dm.train_set.dark.float().mean()) == pytest.approx(0.5, abs=0.2)


def test_seeded_and_class_weights():
    a, b, c = module(seed=1), module(seed=1), module(seed=2)
    assert torch.equal(a.train_set.target, b.train_set.target) and torch.equal(
        a.test_set.inputs["rgb"], b.test_set.inputs["rgb"]
    )
    assert not torch.equal(a.train_set.target, c.train_set.target)
    t = a.train_set.target
    freq = torch.bincount(t[t >= 0], minlength=7).double()
    freq = freq / freq.sum()
    assert torch.allclose(a.class_weights.double(), freq.median() / freq, rtol=1e-5)
    assert a.class_weights[0] < 0.2 < a.class_weights[1:].min()  # the background dominates the pixels


def test_modalities_and_errors():
    dm = module(modalities=["rgb"])
    assert set(dm.test_set[0]["inputs"]) == {"rgb"} and dm.modalities == ["rgb"]
    with pytest.raises(DatasetError, match="odd"):
        RGBDSyntheticDataModule(num_classes=6)
    with pytest.raises(DatasetError, match="dark_fraction"):
        RGBDSyntheticDataModule(dark_fraction=1.5)
    with pytest.raises(DatasetError, match="cannot select"):
        RGBDSyntheticDataModule(modalities=["audio"])
