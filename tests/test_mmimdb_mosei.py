"""MM-IMDB (MultiBench HDF5) and CMU-MOSEI (MultiBench affect pickle): fixtures in the exact on-disk
formats, split membership, the errors, NaN/inf handling, and one training batch through the configs."""

from __future__ import annotations

import logging
import math
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import compose_cfg

from fusionbench.data import MMIMDBDataModule, MOSEIDataModule, mmimdb, mosei
from fusionbench.errors import DatasetError
from fusionbench.train import train

IMDB_SIZES = {"train": 20, "val": 6, "test": 7}
MOSEI_SIZES = {"train": 18, "val": 6, "test": 7}


def imdb_module(folder: Path, **over) -> MMIMDBDataModule:
    kw = {"data_dir": folder, "num_samples": IMDB_SIZES, "batch_size": 8}
    kw.update(over)
    dm = MMIMDBDataModule(**kw)
    dm.prepare_data()
    dm.setup()
    return dm


def mosei_module(folder: Path, **over) -> MOSEIDataModule:
    kw = {"data_dir": folder, "num_samples": MOSEI_SIZES, "batch_size": 8}
    kw.update(over)
    dm = MOSEIDataModule(**kw)
    dm.prepare_data()
    dm.setup()
    return dm


@pytest.fixture
def imdb_dir(tmp_path) -> Path:
    return mmimdb.write_fixture(tmp_path / "mmimdb", IMDB_SIZES)


@pytest.fixture
def mosei_data() -> dict:
    return mosei.make_fixture(MOSEI_SIZES, seed=1)


def rewrite(folder: Path, key: str, value: np.ndarray) -> None:
    with h5py.File(folder / mmimdb.FILE, "a") as f:
        del f[key]
        f.create_dataset(key, data=value)


# -- MM-IMDB ------------------------------------------------------------------------------------


def test_mmimdb_fixture_is_the_gmu_mmimdb_layout(imdb_dir):
    with h5py.File(imdb_dir / mmimdb.FILE, "r") as f:
        shapes = {k: (f[k].shape, str(f[k].dtype)) for k in f}
        assert shapes["features"] == ((33, 300), "float32") and shapes["vgg_features"] == (
            (33, 4096),
            "float32",
        )
        assert shapes["genres"] == ((33, 23), "int32") and shapes["images"] == ((33, 3, 256, 160), "int32")
        assert shapes["imdb_ids"] == ((33,), "|S7") and f["sequences"].dtype == object
        assert mmimdb.fuel_splits(f.attrs) == {"train": (0, 20), "dev": (20, 26), "test": (26, 33)}
    assert (imdb_dir / mmimdb.FILE).stat().st_size < 2_000_000  # the posters cost no space


def test_mmimdb_round_trip_and_splits_by_index_range(imdb_dir):
    dm = imdb_module(imdb_dir)
    with h5py.File(imdb_dir / mmimdb.FILE, "r") as f:
        text, image, genres = f["features"][:], f["vgg_features"][:], f["genres"][:]
    assert dm.task_type == "multilabel" and dm.num_outputs == 23
    assert dm.modalities == ["image", "text"] and dm.input_dims == {"image": 4096, "text": 300}
    for split, (a, b) in {"train": (0, 20), "val": (20, 26), "test": (26, 33)}.items():
        ds = getattr(dm, f"{split}_set")
        assert len(ds) == b - a
        np.testing.assert_array_equal(ds.inputs["text"].numpy(), text[a:b])
        np.testing.assert_array_equal(ds.inputs["image"].numpy(), image[a:b])
        np.testing.assert_array_equal(ds.target.numpy(), genres[a:b])
    batch = next(iter(dm.val_dataloader()))  # unshuffled: rows 20..25
    assert batch["inputs"]["image"].shape == (6, 4096) and batch["inputs"]["text"].shape == (6, 300)
    assert batch["inputs"]["text"].dtype == batch["target"].dtype == torch.float32 and batch[
        "target"
    ].shape == (6, 23)
    np.testing.assert_array_equal(batch["target"].numpy(), genres[20:26])
    d = dm.describe()
    assert d["sizes"] == {"train": 20, "val": 6, "test": 7} and d["mmimdb"]["genres"][:3] == [
        "Drama",
        "Comedy",
        "Romance",
    ]
    assert d["mmimdb"]["ranges"] == {"train": (0, 20), "val": (20, 26), "test": (26, 33)}
    assert len(d["checksum"]) == 64


def test_mmimdb_modality_subset_and_fewer_rows_than_the_file(imdb_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="fusionbench"):
        dm = imdb_module(imdb_dir, modalities=["text"], num_samples={"train": 10, "val": 4, "test": 5})
    assert dm.modalities == ["text"] and sorted(dm.test_set.inputs) == ["text"]
    with h5py.File(imdb_dir / mmimdb.FILE, "r") as f:
        np.testing.assert_array_equal(dm.test_set.inputs["text"].numpy(), f["features"][14:19])
    assert "split attribute gives" in caplog.text  # the ranges differ from the file's Fuel split array


def test_mmimdb_defaults_are_multibench_splits():
    dm = MMIMDBDataModule(data_dir="nowhere")
    assert dm.ranges() == {"train": (0, 15552), "val": (15552, 18160), "test": (18160, 25959)}
    assert dm.monitor == {"metric": "val/f1_macro", "mode": "max"} and dm.batch_size == 128
    cfg = compose_cfg(["dataset=mmimdb"])
    assert dict(cfg.dataset.num_samples) == {"train": 15552, "val": 2608, "test": 7799}
    with pytest.raises(DatasetError, match=r"num_samples.val must be a positive integer, got 0"):
        MMIMDBDataModule(data_dir="nowhere", num_samples={"train": 5, "val": 0, "test": 1})


def test_mmimdb_missing_file_says_where_it_comes_from(tmp_path):
    with pytest.raises(
        DatasetError,
        match=r"1 file\(s\) missing in .*nothere \(multimodal_imdb.hdf5\).*archive.org.*"
        r"gmu-mmimdb.*never downloads.*paths.data_dir",
    ):
        MMIMDBDataModule(data_dir=tmp_path / "nothere").prepare_data()
    (tmp_path / mmimdb.FILE).write_text("not hdf5")
    with pytest.raises(DatasetError, match="is not a readable HDF5 file"):
        MMIMDBDataModule(data_dir=tmp_path).prepare_data()


def test_mmimdb_wrong_layout_is_explained(imdb_dir):
    rewrite(imdb_dir, "vgg_features", np.zeros((33, 100), np.float32))
    with pytest.raises(
        DatasetError,
        match=r"dataset 'vgg_features' \(image features\) has shape \(33, 100\), expected \(N, 4096\)",
    ):
        imdb_module(imdb_dir)
    imdb_module(imdb_dir, modalities=["text"])  # the image features are not read then
    rewrite(imdb_dir, "genres", np.zeros((33, 20), np.int32))
    with pytest.raises(
        DatasetError, match=r"'genres' \(multi-hot genres\) has shape \(33, 20\), expected \(N, 23\)"
    ):
        imdb_module(imdb_dir, modalities=["text"])
    rewrite(imdb_dir, "genres", np.full((33, 23), 2, np.int32))
    with pytest.raises(DatasetError, match=r"must be multi-hot \(0/1\), found values \[2\]"):
        imdb_module(imdb_dir, modalities=["text"])
    with h5py.File(imdb_dir / mmimdb.FILE, "a") as f:
        del f["features"]
    with pytest.raises(
        DatasetError,
        match=r"has no dataset 'features' \(text features, expected shape \(N, 300\)\); it holds \[",
    ):
        imdb_module(imdb_dir, modalities=["text"])


def test_mmimdb_splits_that_do_not_fit_the_file(imdb_dir):
    with pytest.raises(
        DatasetError, match=r"has 33 rows but dataset.num_samples asks for 34 \(train 20, val 6, test 8"
    ):
        imdb_module(imdb_dir, num_samples={"train": 20, "val": 6, "test": 8})


def test_mmimdb_nonfinite_features_stop_or_become_zero(imdb_dir):
    with h5py.File(imdb_dir / mmimdb.FILE, "a") as f:
        f["features"][3, 5] = np.nan
        f["features"][28, 0] = np.inf
    with pytest.raises(
        DatasetError,
        match=(
            r"'features' \(text\) has 2 NaN/inf value\(s\) in 2 row\(s\), "
            r"first rows \[3, 28\].*nonfinite=zero"
        ),
    ):
        imdb_module(imdb_dir)
    dm = imdb_module(imdb_dir, nonfinite="zero")
    assert dm.train_set.inputs["text"][3, 5] == 0 and dm.test_set.inputs["text"][2, 0] == 0
    assert all(torch.isfinite(x).all() for x in dm.train_set.inputs.values())
    assert dm.describe()["mmimdb"]["nonfinite_replaced"] == {"text": 2}


def test_mmimdb_checksums_are_verified_when_given(imdb_dir):
    bad = {mmimdb.FILE: "sha256:" + "0" * 64}
    with pytest.raises(DatasetError, match=r"does not match the published files.*verify_checksums=false"):
        imdb_module(imdb_dir, checksums=bad)
    imdb_module(imdb_dir, checksums=bad, verify_checksums=False)


def test_mmimdb_one_batch_through_the_configs(imdb_dir, tmp_path):
    sizes = "{train: 20, val: 6, test: 7}"
    cfg = compose_cfg(
        [
            "dataset=mmimdb",
            f"paths.data_dir={imdb_dir.parent}",
            "fusion=concat",
            "debug=fdr",
            "trainer.enable_progress_bar=false",
            f"dataset.num_samples={sizes}",
        ],
        tmp_path / "run",
    )
    assert sorted(cfg.backbone) == ["image", "text"]
    result, objs = train(cfg)
    assert objs["trainer"].global_step == 1
    for key in ("test/f1_micro", "test/f1_macro", "test/loss"):
        assert math.isfinite(result["metrics"][key]), key
    assert 0.0 <= result["metrics"]["test/f1_macro"] <= 1.0


# -- CMU-MOSEI ----------------------------------------------------------------------------------


def test_mosei_fixture_is_the_multibench_pickle(tmp_path, mosei_data):
    folder = mosei.write_fixture(tmp_path / "mosei", data=mosei_data)
    with open(folder / mosei.FILE, "rb") as f:
        data = pickle.load(f)
    assert sorted(data) == ["test", "train", "valid"]
    train_split = data["train"]
    assert sorted(train_split) == ["audio", "id", "labels", "text", "vision"]
    assert train_split["text"].shape == (18, 50, 300) and train_split["audio"].shape == (18, 50, 74)
    assert train_split["vision"].shape == (18, 50, 35) and train_split["labels"].shape == (18, 1, 1)
    assert train_split["text"].dtype == np.float32 and len(data["valid"]["labels"]) == 6
    assert np.isneginf(train_split["audio"]).any() and (train_split["labels"] == 0).any()
    assert np.abs(train_split["labels"]).max() <= 3
    assert (train_split["text"][:, 0] == 0).any()  # left padding


def test_mosei_round_trip_splits_and_audio_neg_inf(tmp_path, mosei_data):
    folder = mosei.write_fixture(tmp_path / "mosei", data=mosei_data)
    dm = mosei_module(folder)
    assert (
        dm.task_type == "regression" and dm.num_outputs == 1 and dm.modalities == ["audio", "text", "vision"]
    )
    assert dm.input_dims == {"audio": 50 * 74, "text": 50 * 300, "vision": 50 * 35}
    for split, key in (("train", "train"), ("val", "valid"), ("test", "test")):
        ds, raw = getattr(dm, f"{split}_set"), mosei_data[key]
        assert len(ds) == MOSEI_SIZES[split]
        audio = np.where(np.isneginf(raw["audio"]), 0, raw["audio"])
        np.testing.assert_array_equal(ds.inputs["audio"].numpy(), audio)
        np.testing.assert_array_equal(ds.inputs["text"].numpy(), raw["text"])
        np.testing.assert_array_equal(ds.inputs["vision"].numpy(), raw["vision"])
        np.testing.assert_array_equal(ds.target.numpy(), raw["labels"].reshape(-1, 1))
    batch = next(iter(dm.test_dataloader()))
    assert batch["inputs"]["text"].shape == (7, 50, 300) and batch["inputs"]["vision"].shape == (7, 50, 35)
    assert batch["inputs"]["audio"].dtype == batch["target"].dtype == torch.float32 and batch[
        "target"
    ].shape == (7, 1)
    cleaned = dm.describe()["mosei"]["cleaned"]
    assert cleaned["train"]["audio_neg_inf_to_0"] == int(np.isneginf(mosei_data["train"]["audio"]).sum()) > 0


def test_mosei_drops_empty_text_and_right_pads_like_multibench(tmp_path, mosei_data):
    mosei_data["train"]["text"][2] = 0.0
    folder = mosei.write_fixture(tmp_path / "mosei", data=mosei_data)
    dm = mosei_module(folder)
    keep = [i for i in range(18) if i != 2]
    assert len(dm.train_set) == 17 and dm.describe()["mosei"]["dropped_empty_text"] == {
        "train": 1,
        "val": 0,
        "test": 0,
    }
    np.testing.assert_array_equal(
        dm.train_set.target.numpy().ravel(), mosei_data["train"]["labels"].ravel()[keep]
    )
    assert len(mosei_module(folder, drop_empty_text=False).train_set) == 18

    right = mosei_module(folder, padding="right")
    raw = mosei_data["train"]
    for j, i in enumerate(keep[:5]):
        length = int(np.any(raw["text"][i] != 0, axis=1).sum())
        for m in ("text", "vision"):
            x = right.train_set.inputs[m][j].numpy()
            np.testing.assert_array_equal(x[:length], raw[m][i, 50 - length :])
            assert (x[length:] == 0).all()


def test_mosei_missing_file_says_where_it_comes_from(tmp_path):
    with pytest.raises(
        DatasetError,
        match=r"missing in .*\(mosei_senti_data.pkl\).*Google Drive folder linked in "
        r"MultiBench's README.*never downloads.*paths.data_dir",
    ):
        MOSEIDataModule(data_dir=tmp_path).prepare_data()
    (tmp_path / mosei.FILE).write_bytes(b"\x00garbage")
    with pytest.raises(DatasetError, match="is not a readable pickle"):
        mosei_module(tmp_path)
    mosei.write_fixture(tmp_path, data={"train": {}, "test": {}})
    with pytest.raises(
        DatasetError, match=r"has no split\(s\) \['valid'\]; it holds keys \['test', 'train'\]"
    ):
        mosei_module(tmp_path)


def test_mosei_wrong_shapes_and_keys_are_explained(tmp_path, mosei_data):
    folder = tmp_path / "mosei"
    mosei_data["valid"]["audio"] = mosei_data["valid"]["audio"][:, :, :70]
    mosei.write_fixture(folder, data=mosei_data)
    with pytest.raises(
        DatasetError, match=r"\['valid'\]\['audio'\] has shape \(6, 50, 70\), expected \(6, 50, 74\)"
    ):
        mosei_module(folder)
    mosei_module(folder, modalities=["text", "vision"])  # audio is not needed then
    mosei_data["valid"]["labels"] = np.zeros((6, 1, 7), np.float32)
    mosei.write_fixture(folder, data=mosei_data)
    with pytest.raises(
        DatasetError, match=r"\['valid'\]\['labels'\] has shape \(6, 1, 7\), expected \(6, 1, 1\)"
    ):
        mosei_module(folder, modalities=["text"])
    mosei_data["valid"]["labels"] = np.zeros((6, 1), np.float32)  # (N, 1) and (N,) are accepted too
    del mosei_data["test"]["vision"]
    mosei.write_fixture(folder, data=mosei_data)
    with pytest.raises(
        DatasetError, match=r"\['test'\] has no key 'vision'; it holds \['audio', 'id', 'labels', 'text'\]"
    ):
        mosei_module(folder, modalities=["vision"])
    assert mosei_module(folder, modalities=["text"]).val_set.target.shape == (6, 1)


def test_mosei_split_sizes_are_checked(tmp_path, mosei_data):
    folder = mosei.write_fixture(tmp_path / "mosei", data=mosei_data)
    with pytest.raises(
        DatasetError, match=r"\['train'\] has 18 samples, expected 16326 \(dataset.num_samples.train\)"
    ):
        mosei_module(folder, num_samples=mosei.SIZES)
    assert len(mosei_module(folder, num_samples=None).train_set) == 18
    cfg = compose_cfg(["dataset=mosei"])
    assert dict(cfg.dataset.num_samples) == {"train": 16326, "val": 1871, "test": 4659}


def test_mosei_nonfinite_values_stop_or_become_zero(tmp_path, mosei_data):
    folder = tmp_path / "mosei"
    mosei_data["test"]["vision"][4, 49, 0] = np.nan
    mosei_data["test"]["audio"][1, 49, 0] = np.inf  # +inf is not what MultiBench cleans
    mosei.write_fixture(folder, data=mosei_data)
    with pytest.raises(
        DatasetError,
        match=r"\['test'\]\['audio'\] has 1 NaN/inf value\(s\) other than audio -inf .*"
        r"first samples \[1\]. Set `dataset.nonfinite=zero`",
    ):
        mosei_module(folder)
    with pytest.raises(
        DatasetError,
        match=r"\['test'\]\['vision'\] has 1 NaN/inf value\(s\) in 1 sample\(s\), first samples \[4\]",
    ):
        mosei_module(folder, modalities=["text", "vision"])
    dm = mosei_module(folder, nonfinite="zero")
    assert dm.test_set.inputs["vision"][4, 49, 0] == 0 and dm.test_set.inputs["audio"][1, 49, 0] == 0
    assert all(
        torch.isfinite(x).all()
        for s in ("train", "val", "test")
        for x in getattr(dm, f"{s}_set").inputs.values()
    )
    assert dm.describe()["mosei"]["cleaned"]["test"]["vision_nonfinite_to_0"] == 1
    mosei_data["train"]["labels"][3] = np.nan
    mosei.write_fixture(folder, data=mosei_data)
    with pytest.raises(
        DatasetError, match=r"\['train'\]\['labels'\] has 1 NaN/inf score\(s\), first samples \[3\]"
    ):
        mosei_module(folder, nonfinite="zero")


def test_mosei_one_batch_through_the_configs(tmp_path, mosei_data):
    mosei.write_fixture(tmp_path / "data" / "mosei", data=mosei_data)
    sizes = "{train: 18, val: 6, test: 7}"
    cfg = compose_cfg(
        [
            "dataset=mosei",
            f"paths.data_dir={tmp_path / 'data'}",
            "fusion=concat",
            "debug=fdr",
            "trainer.enable_progress_bar=false",
            f"dataset.num_samples={sizes}",
            "dataset.batch_size=8",
        ],
        tmp_path / "run",
    )
    assert sorted(cfg.backbone) == ["audio", "text", "vision"]
    result, objs = train(cfg)
    assert objs["trainer"].global_step == 1
    for key in ("test/mse", "test/mae", "test/loss"):
        assert math.isfinite(result["metrics"][key]), key
    assert result["metrics"]["test/mae"] == pytest.approx(
        result["metrics"]["test/loss"], rel=1e-5
    )  # trained on L1
    assert objs["task"].regression_loss == "l1"
    for key in ("test/acc2_has0", "test/acc2_non0"):
        assert 0.0 <= result["metrics"][key] <= 1.0, key
