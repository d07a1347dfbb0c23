"""AV-MNIST: the builder (IDX reader, PCA corruption, spectrograms, pairing, determinism, atomicity,
manifest) on tiny MNIST/FSDD-format inputs, and the loader on built and MultiBench-layout folders."""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fusionbench import ROOT
from fusionbench.data import AVMNISTDataModule
from fusionbench.data import avmnist_build as build
from fusionbench.errors import DatasetError

N_TRAIN, N_TEST = 40, 20
SPEAKERS = {"jackson": 2, "nicolas": 1, "yweweler": 2, "george": 1}  # clips per digit; george is never used


# -- tiny inputs in the real formats -----------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    """IDX: big-endian magic 0x08 (uint8) << 8 | ndim, one int32 per dim, then the bytes."""
    header = struct.pack(">i", 0x800 | array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_wav(path: Path, samples: np.ndarray, rate: int = 8000) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())


def make_sources(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """``root/mnist`` with the four IDX files (train gzipped, test raw) and ``root/fsdd/recordings``."""
    rng = np.random.default_rng(seed)
    mnist = root / "mnist"
    mnist.mkdir(parents=True)
    for stem, n, gz in (("train", N_TRAIN, True), ("t10k", N_TEST, False)):
        labels = rng.permutation(np.arange(n) % 10)
        images = rng.integers(0, 256, size=(n, 28, 28))
        write_idx(mnist / (f"{stem}-images-idx3-ubyte" + ".gz" * gz), images, gz)
        write_idx(mnist / (f"{stem}-labels-idx1-ubyte" + ".gz" * gz), labels, gz)
    rec = root / "fsdd" / "recordings"
    rec.mkdir(parents=True)
    for speaker, k in SPEAKERS.items():
        for d in range(10):
            for i in range(k):
                t = np.arange(int(rng.integers(250, 900))) / 8000
                write_wav(rec / f"{d}_{speaker}_{i}.wav", 8000 * np.sin(2 * np.pi * (300 + 250 * d) * t))
    return mnist, root / "fsdd"


@pytest.fixture
def sources(tmp_path) -> tuple[Path, Path]:
    return make_sources(tmp_path / "src")


def array_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*.npy"))}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- IDX ---------------------------------------------------------------------------------------


def test_idx_round_trip_gzipped_and_raw(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28)).astype(np.uint8)
    for gz in (True, False):
        np.testing.assert_array_equal(build.read_idx(write_idx(tmp_path / f"x{gz}", x, gz), 0x803), x)
    y = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    np.testing.assert_array_equal(build.read_idx(write_idx(tmp_path / "y", y), 0x801), y)


def test_idx_errors_name_the_file_and_the_expectation(sources):
    mnist, _ = sources
    images = mnist / "train-images-idx3-ubyte.gz"
    images.write_bytes(
        (mnist / "train-labels-idx1-ubyte.gz").read_bytes()
    )  # a labels file under the images name
    with pytest.raises(
        DatasetError, match=r"train-images-idx3-ubyte.gz is not an IDX file with magic 0x803 .*0x801"
    ):
        build.read_mnist(mnist, "train")
    write_idx(images, np.zeros((3, 28, 28)))
    raw = gzip.decompress(images.read_bytes())
    images.write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(
        DatasetError, match=r"train-images-idx3-ubyte.gz header says \(3, 28, 28\).*truncated"
    ):
        build.read_mnist(mnist, "train")
    (mnist / "t10k-labels-idx1-ubyte").unlink()
    missing = r"t10k-labels-idx1-ubyte.gz \(or uncompressed t10k-labels-idx1-ubyte\) is missing"
    with pytest.raises(DatasetError, match=missing):
        build.read_mnist(mnist, "test")


# -- image and audio transforms -----------------------------------------------------------------


def test_pca_keeps_the_leading_components_past_the_stated_energy():
    rng = np.random.default_rng(1)
    low_rank = rng.normal(size=(300, 4)) @ rng.normal(size=(4, 784))
    x = 128 + rng.normal(size=(300, 784)) * np.linspace(3, 0.1, 784) + low_rank
    rec, k = build.pca_degrade(x, energy_kept=0.25)
    assert rec.dtype == np.float32 and rec.shape == (300, 784) and 1 < k < 784
    xc = x - x.mean(0)
    evr = np.linalg.svd(xc, compute_uv=False) ** 2
    evr = np.cumsum(evr) / evr.sum()
    assert evr[k - 1] > 0.25 >= evr[k - 2]
    kept = rec - x.mean(0)  # the reconstruction is the mean plus a rank-k part
    sv = np.linalg.svd(kept.astype(np.float64), compute_uv=False)
    assert sv[k - 1] > 1e3 * sv[k]
    assert ((kept**2).sum() / (xc**2).sum()) == pytest.approx(evr[k - 1], rel=1e-3)
    # on integer pixels it matches the exact reconstruction (the projector is rounded for reproducibility)
    pixels = np.round(x).astype(np.uint8)
    rec, k = build.pca_degrade(pixels)
    u = np.linalg.svd(pixels - pixels.mean(0), full_matrices=False)[2][:k].T
    np.testing.assert_allclose(rec, pixels.mean(0) + (pixels - pixels.mean(0)) @ u @ u.T, atol=0.01)


def test_spectrogram_shape_and_tone_bin():
    k = 30  # bin k is k * 8000 / 222 Hz
    t = np.arange(4000) / 8000
    spec = build.spectrogram(10000 * np.sin(2 * np.pi * k * 8000 / 222 * t))
    assert spec.shape == (112, 112) and spec.dtype == np.uint8
    assert (spec.argmax(axis=0) == k).all()  # [freq, time]: every frame peaks at the tone
    assert build.spectrogram(np.zeros(100)).max() == 0  # short clips are padded, silence stays 0
    assert build.spectrogram(np.full(400, 32767.0)).max() == 255  # full-scale DC hits the top of the scale


def test_noise_is_at_the_requested_snr():
    x = 1000 * np.sin(np.arange(80000) / 7)
    noisy = build.add_noise(x, 10.0, np.random.default_rng(0))
    snr = 10 * np.log10(np.mean(x**2) / np.mean((noisy - x) ** 2))
    assert snr == pytest.approx(10.0, abs=0.1)


# -- the build ----------------------------------------------------------------------------------


def test_build_layout_pairing_and_manifest(sources, tmp_path):
    mnist, fsdd = sources
    out = build.build_avmnist(mnist, fsdd, tmp_path / "data", seed=0)
    assert out == tmp_path / "data" / "avmnist"
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        image, audio = np.load(out / f"image/{split}_data.npy"), np.load(out / f"audio/{split}_data.npy")
        labels = np.load(out / f"{split}_labels.npy")
        assert (image.shape, image.dtype, audio.shape, audio.dtype, labels.shape, labels.dtype) == (
            (n, 784),
            np.float32,
            (n, 112, 112),
            np.uint8,
            (n,),
            np.int64,
        )
        assert 0 <= image.min() and image.max() <= 255
        stem = "train" if split == "train" else "t10k"
        idx = mnist / (f"{stem}-labels-idx1-ubyte" + ".gz" * (split == "train"))
        np.testing.assert_array_equal(labels, build.read_idx(idx, 0x801))
        clips = (out / f"audio/{split}_sources.txt").read_text().split()
        assert [int(c[0]) for c in clips] == labels.tolist()  # every row hears its own digit
        speakers = {c.split("_")[1] for c in clips}
        assert speakers <= ({"jackson", "nicolas"} if split == "train" else {"yweweler"})
    # cycling: with 3 train clips per digit and 4 rows per digit, each clip is used, one twice
    train_clips = (out / "audio/train_sources.txt").read_text().split()
    assert len(set(train_clips)) == 30
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["params"]["noise_snr_db"] == 10.0 and manifest["params"]["seed"] == 0
    assert "ESC-50" in manifest["noise"] and "ESC-50" in (out / "PROVENANCE.md").read_text()
    assert manifest["sources"]["fsdd"]["wavs_used"] == 50
    assert manifest["sources"]["mnist"]["t10k-images-idx3-ubyte"]["sha256"] == sha256(
        mnist / "t10k-images-idx3-ubyte"
    )
    for rel, h in array_hashes(out).items():
        assert manifest["files"][rel]["sha256"] == h
    assert manifest["files"]["audio/train_data.npy"]["shape"] == [N_TRAIN, 112, 112]


def test_build_is_deterministic_per_seed(sources, tmp_path):
    mnist, fsdd = sources
    a = array_hashes(build.build_avmnist(mnist, fsdd, tmp_path / "a", seed=0))
    b = array_hashes(build.build_avmnist(mnist, fsdd, tmp_path / "b", seed=0))
    c = array_hashes(build.build_avmnist(mnist, fsdd, tmp_path / "c", seed=1))
    assert a == b
    assert a["audio/train_data.npy"] != c["audio/train_data.npy"]
    assert a["image/train_data.npy"] == c["image/train_data.npy"]  # the seed only drives clip order and noise
    assert (tmp_path / "a/avmnist/manifest.json").read_bytes() == (
        tmp_path / "b/avmnist/manifest.json"
    ).read_bytes()


def test_a_failed_build_leaves_nothing_behind(sources, tmp_path, monkeypatch):
    mnist, fsdd = sources
    data = tmp_path / "data"
    bad = fsdd / "recordings" / "7_nicolas_0.wav"
    write_wav(bad, np.zeros(500), rate=16000)
    with pytest.raises(DatasetError, match=r"7_nicolas_0.wav is 16000 Hz.*must be 8000 Hz"):
        build.build_avmnist(mnist, fsdd, data)
    assert not data.exists() or list(data.iterdir()) == []
    write_wav(bad, np.zeros(500))
    # a failure mid-build (after staging started) removes the staging folder and keeps an old build
    old = array_hashes(build.build_avmnist(mnist, fsdd, data, seed=0))

    def boom(*a, **k):
        raise DatasetError("disk full")

    monkeypatch.setattr(build, "make_audio", boom)
    with pytest.raises(DatasetError, match="disk full"):
        build.build_avmnist(mnist, fsdd, data, seed=1)
    assert sorted(p.name for p in data.iterdir()) == ["avmnist"]
    assert array_hashes(data / "avmnist") == old


def test_cli_builds_and_verifies(sources, tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import prepare_data
    finally:
        sys.path.pop(0)
    mnist, fsdd = sources
    data = tmp_path / "data"
    argv = ["prepare_data.py", "avmnist", "--mnist", str(mnist), "--fsdd", str(fsdd), "--data-dir", str(data)]
    argv += ["--noise-snr-db", "5"]
    monkeypatch.setattr(sys, "argv", argv)
    prepare_data.main()
    assert json.loads((data / "avmnist/manifest.json").read_text())["params"]["noise_snr_db"] == 5.0
    monkeypatch.setattr(
        sys, "argv", ["prepare_data.py", "avmnist", "--mnist", str(mnist), "--data-dir", str(data)]
    )
    with pytest.raises(SystemExit):
        prepare_data.main()
    assert "give both --mnist DIR and --fsdd DIR" in capsys.readouterr().err


# -- the loader ---------------------------------------------------------------------------------


def from_config(data_dir: Path, **over) -> AVMNISTDataModule:
    cfg = OmegaConf.load(ROOT / "configs" / "dataset" / "avmnist.yaml")
    cfg.data_dir = str(data_dir)
    for k, v in over.items():
        cfg[k] = v
    return instantiate(cfg, _convert_="all")


def test_loader_on_multibench_layout_without_manifest(tmp_path):
    folder = AVMNISTDataModule.write(tmp_path / "avmnist", n_train=60, n_test=20)
    dm = from_config(folder, num_train=50, num_samples=None)
    assert dm.monitor == {"metric": "val/acc", "mode": "max"} and dm.batch_size == 40
    dm.setup()
    assert dm.modalities == ["audio", "image"] and dm.input_dims == {"audio": 12544, "image": 784}
    assert dm.describe()["sizes"] == {"train": 50, "val": 10, "test": 20}
    assert dm.describe()["build"] == "multibench files (no manifest)" and len(dm.data_checksum) == 64
    batch = next(iter(dm.val_dataloader()))
    assert batch["inputs"]["image"].shape == (10, 1, 28, 28) and batch["inputs"]["audio"].shape == (
        10,
        1,
        112,
        112,
    )
    assert all(x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 for x in batch["inputs"].values())
    assert batch["target"].dtype == torch.int64
    raw = np.load(folder / "audio/train_data.npy")[50]
    torch.testing.assert_close(batch["inputs"]["audio"][0, 0], torch.from_numpy(raw / np.float32(255)))
    assert batch["target"][0] == int(np.load(folder / "train_labels.npy")[50])  # val = rows after num_train


def test_loader_modality_subset_and_bad_split(tmp_path):
    folder = AVMNISTDataModule.write(tmp_path / "avmnist", n_train=30, n_test=10)
    (folder / "audio/train_data.npy").unlink()  # not needed for image alone
    dm = AVMNISTDataModule(data_dir=folder, modalities=["image"], num_train=25)
    dm.setup()
    assert set(dm.train_set[0]["inputs"]) == {"image"} and dm.input_dims == {"image": 784}
    with pytest.raises(
        DatasetError, match=r"num_train=30 must leave both a training and a validation split of the 30"
    ):
        AVMNISTDataModule(data_dir=folder, modalities=["image"], num_train=30).setup()
    with pytest.raises(DatasetError, match=r"cannot select \['video'\]"):
        AVMNISTDataModule(data_dir=folder, modalities=["video"])


def test_loader_verifies_a_built_folder_against_its_manifest(sources, tmp_path):
    mnist, fsdd = sources
    out = build.build_avmnist(mnist, fsdd, tmp_path / "data", seed=0)
    dm = AVMNISTDataModule(data_dir=out, num_train=32)
    dm.setup()
    assert dm.data_checksum == hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()
    assert dm.describe()["build"] == {"seed": 0, "noise_snr_db": 10.0, "energy_kept": 0.25}
    assert len(dm.val_set) == 8 and len(dm.test_set) == N_TEST
    audio = np.load(out / "audio/test_data.npy")
    audio[3, 5, 7] ^= 1  # same shape, one bit changed
    np.save(out / "audio/test_data.npy", audio)
    with pytest.raises(
        DatasetError, match=r"is corrupt: audio/test_data.npy .*prepare_data.py avmnist --mnist"
    ):
        AVMNISTDataModule(data_dir=out, num_train=32).prepare_data()
    AVMNISTDataModule(data_dir=out, num_train=32, verify_checksums=False).prepare_data()


def test_missing_files_name_the_build_command(tmp_path):
    with pytest.raises(DatasetError) as e:
        from_config(tmp_path / "nowhere").prepare_data()
    msg = str(e.value)
    assert "train_labels.npy" in msg and "audio/test_data.npy" in msg and str(tmp_path / "nowhere") in msg
    assert "python scripts/prepare_data.py avmnist --mnist DIR --fsdd DIR" in msg
    assert "free-spoken-digit-dataset" in msg and "avmnist.tar.gz" in msg  # where a user gets the sources


def test_wrong_shapes_are_explained(tmp_path):
    folder = AVMNISTDataModule.write(tmp_path / "avmnist", n_train=30, n_test=10)
    np.save(folder / "audio/test_data.npy", np.zeros((10, 112, 100), dtype=np.uint8))
    wrong = r"audio/test_data.npy \(audio\) has shape \(10, 112, 100\), expected \(10, 112, 112\)"
    with pytest.raises(DatasetError, match=wrong):
        AVMNISTDataModule(data_dir=folder, num_train=25).prepare_data()
    with pytest.raises(DatasetError, match=r"train_labels.npy has shape \(30,\), expected \(60000,\)"):
        from_config(folder).prepare_data()  # the config expects the full-size files
