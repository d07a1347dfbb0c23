"""NYU Depth V2: the prepare step from a tiny official-format .mat (HDF5, transposed, official field names)
to ESANet's PNG layout (class maps checked by hand, depth in mm, staging never left behind, SHA256SUMS),
and `NYUv2DataModule` on it (batches, void, normalisation, class weights, augmentation, errors)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from nyuv2_fixture import (
    COLOURS,
    DEPTH_M,
    RAW_CLASSES,
    frame_arrays,
    nyuv2_fixture_dir,
    write_labeled_mat,
    write_splits_mat,
)

from fusionbench import ROOT
from fusionbench.data import NYUv2DataModule
from fusionbench.data import nyuv2 as nyu
from fusionbench.data.segmentation import (
    RGBDTrainAugment,
    class_pixel_counts,
    median_frequency_weights,
    read_depth,
    read_label,
    read_rgb,
    write_png,
)
from fusionbench.errors import DatasetError

H, W = 30, 40


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Frames 1-4 train, 5-6 test, prepared by the real step."""
    return nyuv2_fixture_dir(tmp_path_factory.mktemp("nyu"), n_train=4, n_test=2, height=H, width=W)


def dm_of(folder: Path, **kw) -> NYUv2DataModule:
    kw = {"height": 24, "width": 32, "num_workers": 0, "batch_size": 2, **kw}
    return NYUv2DataModule(data_dir=folder, **kw)


def staging_left(root: Path) -> list[str]:
    return [p.name for p in root.iterdir() if p.name.startswith(".nyuv2-")]


# -- helpers ----------------------------------------------------------------------------------------


def test_median_frequency_weights_hand_example():
    # image A [[1,1],[2,0]], image B [[1,3],[3,3]], C = 4 (class 4 never occurs)
    labels = [np.array([[1, 1], [2, 0]], np.uint8), np.array([[1, 3], [3, 3]], np.uint8)]
    pixels, image_pixels = class_pixel_counts(labels, 4)
    assert pixels.tolist() == [3, 1, 3, 0] and image_pixels.tolist() == [8, 4, 4, 0]
    # freq = 3/8, 1/4, 3/4 -> median 3/8 -> weights 1, 1.5, 0.5; unseen -> 0 (not nan / inf)
    np.testing.assert_allclose(median_frequency_weights(pixels, image_pixels), [1.0, 1.5, 0.5, 0.0])
    assert median_frequency_weights([0, 0], [0, 0]).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="label value 5 > 4"):
        class_pixel_counts([np.array([[5]], np.uint8)], 4)


def test_png_helpers_round_trip(tmp_path):
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 7
    depth = np.array([[0, 65535, 1234], [1, 2, 3]], np.uint16)
    label = np.array([[0, 40, 3], [1, 2, 255]], np.uint8)
    for name, a in (("rgb", rgb), ("depth", depth), ("label", label)):
        write_png(tmp_path / f"{name}.png", a)
    assert np.array_equal(read_rgb(tmp_path / "rgb.png"), rgb)
    d = read_depth(tmp_path / "depth.png")
    assert d.dtype == np.uint16 and np.array_equal(d, depth)
    assert np.array_equal(read_label(tmp_path / "label.png"), label)
    with pytest.raises(DatasetError, match="single-channel"):
        read_depth(tmp_path / "rgb.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="junk.png is not a readable PNG"):
        read_label(tmp_path / "junk.png")


# -- prepare ----------------------------------------------------------------------------------------


def test_prepare_writes_esanet_layout_with_mapped_labels_and_mm_depth(prepared):
    assert (prepared / "train.txt").read_text() == "0001\n0002\n0003\n0004\n"
    assert (prepared / "test.txt").read_text() == "0005\n0006\n"
    assert (prepared / "class_names_1+40.txt").read_text().splitlines()[:3] == ["void", "wall", "floor"]
    assert len((prepared / "class_names_1+13.txt").read_text().splitlines()) == 14
    assert len((prepared / "class_names_1+894.txt").read_text().splitlines()) == 895
    for split, frames in (("train", range(1, 5)), ("test", range(5, 7))):
        for i in frames:
            src = frame_arrays(i - 1, H, W)
            raw = src["labels"]
            p = prepared / split
            assert np.array_equal(read_rgb(p / "rgb" / f"{i:04d}.png"), src["images"])
            depth = read_depth(p / "depth" / f"{i:04d}.png")
            expected_mm = np.vectorize(lambda r: round(DEPTH_M[r] * 1000))(raw)
            assert depth.dtype == np.uint16 and np.array_equal(depth, expected_mm)
            depth_raw = read_depth(p / "depth_raw" / f"{i:04d}.png")
            assert depth_raw[0, 0] == 0 and np.array_equal(depth_raw[H // 2 :], expected_mm[H // 2 :])
            assert np.array_equal(read_depth(p / "labels_894" / f"{i:04d}.png"), raw)
            l40 = read_label(p / "labels_40" / f"{i:04d}.png")
            l13 = read_label(p / "labels_13" / f"{i:04d}.png")
            assert np.array_equal(l40, np.vectorize(lambda r: RAW_CLASSES[r][0])(raw))
            assert np.array_equal(l13, np.vectorize(lambda r: RAW_CLASSES[r][1])(raw))
    # the hand table agrees with the shipped classes.json
    meta = json.loads((ROOT / "data" / "nyuv2" / "classes.json").read_text())
    for r, (c40, c13) in RAW_CLASSES.items():
        if r:
            assert meta["map_894_to_40"][r - 1] == c40 and meta["map_40_to_13"][c40 - 1] == c13
    # the manifest covers every file and verifies
    sums = nyu.read_manifest(prepared / "SHA256SUMS")
    files = {p.relative_to(prepared).as_posix() for p in prepared.rglob("*") if p.is_file()}
    assert set(sums) == files - {"SHA256SUMS"} and nyu.verify_manifest(prepared, sums) == []
    info = json.loads((prepared / "prepare.json").read_text())
    assert info["frames"] == {"train": 4, "test": 2} and info["frames_in_source"] == 6
    assert not staging_left(prepared.parent)


def test_depth_is_truncated_to_mm_like_esanet():
    assert nyu.depth_to_mm(np.array([1.2345, 0.0, 70.0, np.nan])).tolist() == [1234, 0, 65535, 0]


def test_prepare_command_runs_as_a_subprocess_and_replaces_the_target(tmp_path):
    mat = write_labeled_mat(tmp_path / "nyu_depth_v2_labeled.mat", 3, 12, 16)
    splits = write_splits_mat(tmp_path / "s.mat", [1, 3], [2])
    root = tmp_path / "data"
    (root / "nyuv2").mkdir(parents=True)
    (root / "nyuv2" / "old.txt").write_text("an older layout\n")
    cmd = [sys.executable, str(ROOT / "scripts" / "prepare_data.py"), "nyuv2", "--from", str(mat)]
    cmd += ["--splits", str(splits), "--data-dir", str(root)]
    r = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert r.returncode == 0, r.stderr
    assert "nyuv2: prepared into" in r.stdout
    target = root / "nyuv2"
    assert (target / "train.txt").read_text() == "0001\n0003\n" and not (target / "old.txt").exists()
    assert (target / "test" / "labels_40" / "0002.png").is_file() and not staging_left(root)


def test_a_mat_without_labels_fails_clearly_and_leaves_nothing(tmp_path):
    mat = write_labeled_mat(tmp_path / "bad.mat", 3, 12, 16, drop="labels")
    splits = write_splits_mat(tmp_path / "s.mat", [1, 2], [3])
    with pytest.raises(DatasetError, match=r"no dataset 'labels'.*official file holds 'labels' as uint16"):
        nyu.prepare_nyuv2(mat, tmp_path / "data", splits=splits)
    assert not (tmp_path / "data" / "nyuv2").exists()
    assert not (tmp_path / "data").exists() or not staging_left(tmp_path / "data")


def test_a_non_hdf5_mat_is_explained(tmp_path):
    v5 = write_splits_mat(tmp_path / "v5.mat", [1], [2])  # a MATLAB v5 file, not v7.3
    with pytest.raises(DatasetError, match="not an HDF5 file.*images: uint8"):
        nyu.prepare_nyuv2(v5, tmp_path / "data", splits=v5)
    with pytest.raises(DatasetError, match="no field 'trainNdxs'"):
        from scipy.io import savemat

        savemat(tmp_path / "x.mat", {"train": np.ones((2, 1))})
        nyu.read_splits(tmp_path / "x.mat")


def test_a_split_beyond_the_mat_is_refused(tmp_path):
    mat = write_labeled_mat(tmp_path / "m.mat", 2, 8, 8)
    splits = write_splits_mat(tmp_path / "s.mat", [1], [7])
    with pytest.raises(DatasetError, match="frames up to 7, but .* holds 2"):
        nyu.prepare_nyuv2(mat, tmp_path / "data", splits=splits)


def test_a_failure_while_writing_keeps_the_old_target_and_no_staging(tmp_path, monkeypatch):
    mat = write_labeled_mat(tmp_path / "m.mat", 3, 8, 8)
    splits = write_splits_mat(tmp_path / "s.mat", [1, 2], [3])
    root = tmp_path / "data"
    first = nyu.prepare_nyuv2(mat, root, splits=splits)
    before = (first / "SHA256SUMS").read_text()
    calls, real = [], nyu.write_png

    def failing(path, array):
        calls.append(path)
        if len(calls) > 5:
            raise OSError("disk full")
        real(path, array)

    monkeypatch.setattr(nyu, "write_png", failing)
    with pytest.raises(OSError, match="disk full"):
        nyu.prepare_nyuv2(mat, root, splits=splits)
    assert (first / "SHA256SUMS").read_text() == before and not staging_left(root)


# -- datamodule -------------------------------------------------------------------------------------


def test_batches_follow_the_contract(prepared):
    torch.manual_seed(0)
    dm = dm_of(prepared)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.task_type == "segmentation" and dm.num_outputs == 40
    assert dm.input_dims == {"depth": 24 * 32, "rgb": 3 * 24 * 32}
    assert dm.monitor == {"metric": "val/miou", "mode": "max"} and dm.manifest is not None
    b = next(iter(dm.train_dataloader()))
    assert b["inputs"]["rgb"].shape == (2, 3, 24, 32) and b["inputs"]["rgb"].dtype == torch.float32
    assert b["inputs"]["depth"].shape == (2, 1, 24, 32) and b["inputs"]["depth"].dtype == torch.float32
    assert b["target"].shape == (2, 24, 32) and b["target"].dtype == torch.int64
    # evaluation: inputs at the network size, the label at its stored size; void -> -1, class c -> c - 1
    v = next(iter(dm.val_dataloader()))
    assert v["inputs"]["rgb"].shape == (2, 3, 24, 32) and v["target"].shape == (2, H, W)
    raw = frame_arrays(4, H, W)["labels"]  # frame 0005, the first test frame
    expected = np.vectorize(lambda r: RAW_CLASSES[r][0])(raw) - 1
    assert torch.equal(v["target"][0], torch.from_numpy(expected))
    assert (v["target"] == -1).any() and int(v["target"].min()) == -1
    assert len(dm.val_set) == len(dm.test_set) == 2  # NYU has no validation split: val = test


def test_depth_and_rgb_normalisation(prepared):
    dm = dm_of(prepared, height=H, width=W, depth_mean=1000.0, depth_std=500.0)
    dm.setup()
    s = dm.test_set[0]
    mm = np.vectorize(lambda r: DEPTH_M[r] * 1000)(frame_arrays(4, H, W)["labels"])
    np.testing.assert_allclose(s["inputs"]["depth"][0].numpy(), (mm - 1000.0) / 500.0, rtol=1e-6)
    rgb = frame_arrays(4, H, W)["images"].astype(np.float32) / 255.0
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(s["inputs"]["rgb"].permute(1, 2, 0).numpy(), (rgb - mean) / std, rtol=1e-5)
    # default statistics: ESANet's for refined depth; raw depth keeps its holes at 0
    assert (dm_of(prepared).depth_mean, dm_of(prepared).depth_std) == nyu.DEPTH_STATS["refined"]
    raw_dm = dm_of(prepared, depth_mode="raw", height=H, width=W)
    raw_dm.setup()
    d = raw_dm.test_set[0]["inputs"]["depth"][0]
    mean, std = nyu.DEPTH_STATS["raw"]
    assert d[0, 0] == 0 and torch.allclose(
        d[-1], torch.from_numpy(((mm[-1] - mean) / std).astype(np.float32))
    )


def test_class_weights_are_median_frequency_over_the_training_labels(prepared):
    dm = dm_of(prepared)
    dm.setup()
    labels = [read_label(prepared / "train" / "labels_40" / f"{i:04d}.png") for i in range(1, 5)]
    # by hand: every frame has 7 stripes of the 7 classes -> a class c occupies (its stripe's pixels) in
    # every training image, so freq_c = stripe_c / (H * W) and the weights are median(freq) / freq_c
    counts = np.zeros(41)
    for lab in labels:
        counts += np.bincount(lab.ravel(), minlength=41)
    freq = counts[1:] / (4 * H * W)
    seen = freq > 0
    expected = np.zeros(40)
    expected[seen] = np.median(freq[seen]) / freq[seen]
    assert dm.class_weights.dtype == torch.float32 and dm.class_weights.shape == (40,)
    np.testing.assert_allclose(dm.class_weights.numpy(), expected, rtol=1e-6)
    assert seen.sum() == 6 and (dm.class_weights[~torch.from_numpy(seen)] == 0).all()
    assert dm_of(prepared, class_weighting=None).class_weights is None


def test_augmentation_keeps_rgb_depth_and_label_aligned():
    # label = stripe class, rgb = COLOURS[class], depth = a function of the class: after the transform the
    # nearest-resized depth must equal that function of the label everywhere, and RGB (bilinear) must show
    # the label's colour away from stripe borders
    raw_to = {raw: k + 1 for k, raw in enumerate(RAW_CLASSES)}
    src = frame_arrays(0, 60, 80)
    label = np.vectorize(raw_to.get)(src["labels"]).astype(np.uint8)
    depth = label.astype(np.float32) * 100.0 + 7.0
    colour = np.array([COLOURS[r] for r in RAW_CLASSES], dtype=np.float32)
    aug = RGBDTrainAugment(40, 56, hsv=None, generator=torch.Generator().manual_seed(3))
    flipped = 0
    for _ in range(10):
        rgb2, depth2, label2 = aug(src["images"], depth, label)
        assert rgb2.shape == (40, 56, 3) and rgb2.dtype == np.uint8
        assert depth2.shape == label2.shape == (40, 56) and label2.dtype == np.uint8
        assert np.array_equal(depth2, label2.astype(np.float32) * 100.0 + 7.0)
        interior = np.zeros_like(label2, bool)
        interior[:, 1:-1] = (label2[:, 1:-1] == label2[:, :-2]) & (label2[:, 1:-1] == label2[:, 2:])
        diff = np.abs(rgb2.astype(np.float32) - colour[label2.astype(int) - 1]).max(axis=-1)
        assert (diff[interior] <= 1).mean() > 0.97
        flipped += int(label2[0, 0] != label[0, 0])
    assert flipped > 0  # the flip / crop did change the view
    # HSV jitter changes colours only, never geometry or labels
    aug_hsv = RGBDTrainAugment(40, 56, generator=torch.Generator().manual_seed(3))
    aug_no = RGBDTrainAugment(40, 56, hsv=None, generator=torch.Generator().manual_seed(3))
    (rgb1, _, l1), (_, _, l2) = aug_hsv(src["images"], depth, label), aug_no(src["images"], depth, label)
    # same draws for rescale and crop; the HSV draws shift the flip draw, so compare up to a flip
    assert np.array_equal(l1, l2) or np.array_equal(l1, l2[:, ::-1])
    assert rgb1.shape == (40, 56, 3) and rgb1.dtype == np.uint8


def test_augmentation_handles_images_smaller_than_the_crop():
    aug = RGBDTrainAugment(32, 48, generator=torch.Generator().manual_seed(0))
    rgb, depth, label = aug(np.zeros((10, 12, 3), np.uint8), None, np.ones((10, 12), np.uint8))
    assert rgb.shape == (32, 48, 3) and depth is None and label.shape == (32, 48) and (label == 1).all()


def test_training_batches_are_reproducible_under_a_seed(prepared):
    from pytorch_lightning import seed_everything

    def first_batch():
        seed_everything(7, workers=True)
        dm = dm_of(prepared)
        dm.setup()
        return next(iter(dm.train_dataloader()))

    a, b = first_batch(), first_batch()
    assert torch.equal(a["inputs"]["rgb"], b["inputs"]["rgb"]) and torch.equal(a["target"], b["target"])
    seed_everything(8, workers=True)
    dm = dm_of(prepared)
    dm.setup()
    c = next(iter(dm.train_dataloader()))
    assert not torch.equal(a["inputs"]["rgb"], c["inputs"]["rgb"])


def test_modalities_val_fraction_and_13_classes(prepared):
    dm = dm_of(prepared, modalities=["rgb"], val_fraction=0.25, num_classes=13)
    dm.setup()
    assert dm.input_dims == {"rgb": 3 * 24 * 32} and dm.num_outputs == 13
    assert len(dm.train_set) == 3 and len(dm.val_set) == 1 and len(dm.test_set) == 2
    assert set(dm.train_set.ids).isdisjoint(dm.val_set.ids) and dm.val_set.folder == "train"
    s = dm.val_set[0]
    assert list(s["inputs"]) == ["rgb"] and int(s["target"].max()) <= 12
    assert dm.class_weights.shape == (13,)


def test_config_builds_the_datamodule(prepared):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ROOT / "configs" / "dataset" / "nyuv2.yaml")
    cfg.data_dir = str(prepared)
    dm = instantiate(cfg, _convert_="all")
    assert isinstance(dm, NYUv2DataModule) and dm.batch_size == 8 and (dm.height, dm.width) == (480, 640)
    assert "prepare_data.py nyuv2 --from nyu_depth_v2_labeled.mat" in dm.how_to_get
    with pytest.raises(DatasetError, match=r"lists 4 frames, expected 795 .*`dataset.num_samples=null`"):
        dm.prepare_data()


def test_status_lists_nyuv2(prepared, tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import prepare_data
    finally:
        sys.path.pop(0)
    cfg = prepare_data.compose_datasets(["nyuv2"], tmp_path)["nyuv2"]
    row = prepare_data.check_dataset("nyuv2", cfg)
    assert row.state == "missing" and "folder does not exist" in row.detail
    assert "prepare_data.py nyuv2 --from" in row.source
    cfg.dataset.data_dir = str(prepared)
    cfg.dataset.num_samples = None
    row = prepare_data.check_dataset("nyuv2", cfg)
    assert row.state == "verified", row


# -- errors -----------------------------------------------------------------------------------------


def copy_of(prepared: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(prepared, tmp_path / "nyuv2"))


def test_missing_folder_and_missing_lists(tmp_path):
    with pytest.raises(DatasetError, match="does not exist.*prepare_data.py nyuv2 --from"):
        dm_of(tmp_path / "nowhere").prepare_data()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="train.txt, test.txt.*prepare_data.py nyuv2"):
        dm_of(tmp_path / "empty").prepare_data()


def test_missing_image_is_named_with_the_command(prepared, tmp_path):
    folder = copy_of(prepared, tmp_path)
    (folder / "test" / "rgb" / "0006.png").unlink()
    with pytest.raises(DatasetError, match=r"test/rgb/0006.png.*prepare_data.py nyuv2 --from"):
        dm_of(folder).prepare_data()
    dm_of(folder, modalities=["depth"], verify_checksums=False).prepare_data()  # rgb not read: fine


def test_split_id_without_files(prepared, tmp_path):
    folder = copy_of(prepared, tmp_path)
    (folder / "train.txt").write_text("0001\n0002\n0042\n")
    with pytest.raises(DatasetError, match=r"train.txt .* missing: train/labels_40/0042.png"):
        dm_of(folder).prepare_data()


def test_label_beyond_the_classes_and_changed_files(prepared, tmp_path):
    folder = copy_of(prepared, tmp_path)
    bad = read_label(folder / "train" / "labels_40" / "0002.png").copy()
    bad[0, 0] = 41
    write_png(folder / "train" / "labels_40" / "0002.png", bad)
    with pytest.raises(
        DatasetError, match=r"does not match its SHA256SUMS: train/labels_40/0002.png changed"
    ):
        dm_of(folder).prepare_data()
    dm = dm_of(folder, verify_checksums=False)
    with pytest.raises(DatasetError, match=r"0002.png holds class id 41.*only 0 \(void\) .. 40"):
        dm.setup()  # the class weights read every training label
