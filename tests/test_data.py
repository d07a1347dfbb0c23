"""Loaders on fixtures written in the real MOGONET format, on the real ROSMAP files, and their errors."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch
from conftest import mogonet_kwargs, write_mogonet_fixture
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fusionbench import ROOT
from fusionbench.data import MogonetDataModule, SyntheticDataModule
from fusionbench.data.base import git_blob_id, stratified_split
from fusionbench.errors import DatasetError

ROSMAP = ROOT / "data" / "rosmap"


def from_config(name: str, data_dir, **over) -> MogonetDataModule:
    """The datamodule exactly as configs/dataset/<name>.yaml builds it, reading ``data_dir``."""
    cfg = OmegaConf.load(ROOT / "configs" / "dataset" / f"{name}.yaml")
    cfg.data_dir = str(data_dir)
    for k, v in over.items():
        cfg[k] = v
    return instantiate(cfg, _convert_="all")


def rosmap() -> MogonetDataModule:
    dm = from_config("rosmap", ROSMAP)
    dm.prepare_data()
    dm.setup()
    return dm


# -- MOGONET layout on fixtures ------------------------------------------------------------------


def test_fixture_loads_with_batch_contract(mogonet_dir):
    dm = MogonetDataModule(**mogonet_kwargs(mogonet_dir))
    dm.prepare_data()
    dm.setup()
    assert dm.modalities == ["meth", "mirna", "mrna"]
    assert dm.input_dims == {"mrna": 6, "meth": 5, "mirna": 4}
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (30, 10, 20)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"inputs", "target"}
    assert batch["inputs"]["mrna"].shape == (16, 6) and batch["inputs"]["mrna"].dtype == torch.float32
    assert batch["target"].dtype == torch.int64


def test_minmax_scaling_uses_training_rows_only(mogonet_dir):
    dm = MogonetDataModule(**mogonet_kwargs(mogonet_dir))
    dm.setup()
    raw_tr = np.loadtxt(mogonet_dir / "1_tr.csv", delimiter=",")
    raw_te = np.loadtxt(mogonet_dir / "1_te.csv", delimiter=",")
    train_idx, _ = stratified_split(torch.arange(40) % 3, 0.25, 0)
    fit = raw_tr[train_idx.numpy()]
    lo, hi = fit.min(0), fit.max(0)
    expected_test = (raw_te - lo) / (hi - lo + 1e-10)
    np.testing.assert_allclose(dm.test_set.inputs["mrna"].numpy(), expected_test, rtol=1e-5, atol=1e-6)
    train_x = dm.train_set.inputs["mrna"]
    assert torch.allclose(train_x.min(0).values, torch.zeros(6), atol=1e-6)
    assert torch.allclose(train_x.max(0).values, torch.ones(6), atol=1e-6)
    # validation rows were not used to fit, so they may leave [0, 1]; test rows are scaled with train stats
    assert not np.allclose(dm.test_set.inputs["mrna"].numpy().min(0), 0.0)


def test_stratified_split_is_seeded_and_keeps_class_shares():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    keep, held = stratified_split(labels, 0.2, seed=3)
    assert torch.bincount(labels[held]).tolist() == [10, 6, 4]
    assert len(set(keep.tolist()) & set(held.tolist())) == 0 and len(keep) + len(held) == 100
    assert torch.equal(held, stratified_split(labels, 0.2, seed=3)[1])
    assert not torch.equal(held, stratified_split(labels, 0.2, seed=4)[1])


def test_select_views_and_test_selection(mogonet_dir):
    dm = MogonetDataModule(**mogonet_kwargs(mogonet_dir, modalities=["mrna", "meth"], selection="test"))
    dm.setup()
    assert dm.modalities == ["meth", "mrna"]
    assert set(dm.train_set.inputs) == {"meth", "mrna"}
    assert dm.val_set is dm.test_set and len(dm.train_set) == 40  # nothing carved out
    assert "3_tr.csv" not in dm.required_files()


def test_unknown_view_is_rejected(mogonet_dir):
    with pytest.raises(DatasetError, match=r"cannot select \['rna'\]"):
        MogonetDataModule(**mogonet_kwargs(mogonet_dir, modalities=["rna"]))


# -- bad input ----------------------------------------------------------------------------------


def test_missing_files_message(tmp_path):
    dm = MogonetDataModule(**mogonet_kwargs(tmp_path / "nowhere", how_to_get="Get it from X."))
    with pytest.raises(DatasetError) as e:
        dm.prepare_data()
    msg = str(e.value)
    assert "labels_tr.csv" in msg and str(tmp_path / "nowhere") in msg and "Get it from X." in msg
    assert "paths.data_dir" in msg


def test_wrong_number_of_rows(mogonet_dir):
    rows = (mogonet_dir / "2_tr.csv").read_text().splitlines()
    (mogonet_dir / "2_tr.csv").write_text("\n".join(rows[:-3]) + "\n")
    with pytest.raises(DatasetError, match=r"2_tr.csv has 37 rows but labels_tr.csv has 40"):
        MogonetDataModule(**mogonet_kwargs(mogonet_dir)).setup()


def test_wrong_number_of_columns(mogonet_dir):
    with pytest.raises(DatasetError, match=r"3_tr.csv \(mirna\) has 4 columns, expected 7"):
        MogonetDataModule(
            **mogonet_kwargs(mogonet_dir, feature_dims={"mrna": 6, "meth": 5, "mirna": 7})
        ).setup()


def test_labels_out_of_range(mogonet_dir):
    np.savetxt(mogonet_dir / "labels_te.csv", np.array([0, 1, 7] + [0] * 17, dtype=float))
    with pytest.raises(DatasetError, match=r"labels outside the integers 0..2 \(e.g. \[7.0\]\)"):
        MogonetDataModule(**mogonet_kwargs(mogonet_dir)).setup()


def test_nan_and_garbage_are_rejected(mogonet_dir):
    x = np.loadtxt(mogonet_dir / "1_te.csv", delimiter=",")
    x[2, 3] = np.nan
    np.savetxt(mogonet_dir / "1_te.csv", x, delimiter=",")
    with pytest.raises(DatasetError, match="NaN"):
        MogonetDataModule(**mogonet_kwargs(mogonet_dir)).setup()
    (mogonet_dir / "1_te.csv").write_text("a,b,c\n1,2,3\n")
    with pytest.raises(DatasetError, match="not a MOGONET matrix"):
        MogonetDataModule(**mogonet_kwargs(mogonet_dir)).setup()


def test_checksums_sha256_and_git_blob(mogonet_dir):
    blob = subprocess.run(
        ["git", "hash-object", str(mogonet_dir / "1_tr.csv")], capture_output=True, text=True
    ).stdout.strip()
    assert git_blob_id(mogonet_dir / "1_tr.csv") == blob
    good = {"1_tr.csv": f"git:{blob}"}
    MogonetDataModule(**mogonet_kwargs(mogonet_dir, checksums=good)).prepare_data()
    bad = {"1_tr.csv": "git:" + "0" * 40}
    with pytest.raises(DatasetError, match=r"1_tr.csv: git is .* expected 0000.*verify_checksums=false"):
        MogonetDataModule(**mogonet_kwargs(mogonet_dir, checksums=bad)).prepare_data()
    MogonetDataModule(**mogonet_kwargs(mogonet_dir, checksums=bad, verify_checksums=False)).prepare_data()


# -- real ROSMAP ----------------------------------------------------------------------------------


def test_real_rosmap():
    dm = rosmap()
    assert dm.describe()["sizes"] == {"train": 196, "val": 49, "test": 106}
    assert dm.input_dims == {"mrna": 200, "meth": 200, "mirna": 200}
    all_train = torch.cat([dm.train_set.target, dm.val_set.target])
    assert torch.bincount(all_train).tolist() == [118, 127]
    assert torch.bincount(dm.test_set.target).tolist() == [51, 55]
    assert len(dm.data_checksum) == 64


def test_rosmap_copy_with_changed_byte_fails_checksum(tmp_path):
    shutil.copytree(ROSMAP, tmp_path / "rosmap")
    path = tmp_path / "rosmap" / "2_te.csv"
    text = path.read_text()
    path.write_text(text[:100] + ("1" if text[100] != "1" else "2") + text[101:])
    dm = from_config("rosmap", tmp_path / "rosmap")
    with pytest.raises(DatasetError, match=r"2_te.csv: sha256 is"):
        dm.prepare_data()


def test_brca_without_files_explains_where_to_get_them(tmp_path):
    dm = from_config("brca", tmp_path / "brca")
    with pytest.raises(DatasetError) as e:
        dm.prepare_data()
    msg = str(e.value)
    for needle in ("1_tr.csv", "MOGONET", "prepare_data.py brca --from", str(tmp_path / "brca")):
        assert needle in msg


def test_brca_config_reads_brca_shaped_fixture(tmp_path):
    """The BRCA config (1000/1000/503 features, 5 classes) on a fixture of those shapes."""
    folder = write_mogonet_fixture(
        tmp_path / "brca", n_tr=612, n_te=263, dims=(1000, 1000, 503), num_classes=5
    )
    dm = from_config(
        "brca", folder, verify_checksums=False
    )  # fixture content differs from the published files
    dm.setup()
    assert dm.num_outputs == 5
    assert dm.input_dims == {"mrna": 1000, "meth": 1000, "mirna": 503}
    assert len(dm.train_set) + len(dm.val_set) == 612 and len(dm.test_set) == 263


def test_synthetic_shapes_and_signal():
    dm = SyntheticDataModule(shapes={"image": [1, 4, 4], "text": 10}, num_outputs=3, noise=0.1)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["inputs"]["image"].shape == (64, 1, 4, 4)
    assert dm.input_dims == {"image": 16, "text": 10}
    # the signal is learnable: a nearest-class-mean classifier on one modality beats chance by far
    x, y = dm.train_set.inputs["text"], dm.train_set.target
    means = torch.stack([x[y == c].mean(0) for c in range(3)])
    xt, yt = dm.test_set.inputs["text"], dm.test_set.target
    acc = (torch.cdist(xt, means).argmin(1) == yt).float().mean()
    assert acc > 0.8
