"""AV-MNIST in the MultiBench / MFAS npy layout (Pro-Fusion; MultiBench ``datasets/avmnist``).

``image/{train,test}_data.npy`` (N, 784) PCA-degraded MNIST, ``audio/{train,test}_data.npy``
(N, 112, 112) spectrograms, ``{train,test}_labels.npy`` (N,) digits. The folder is either built here
by `fusionbench.data.avmnist_build` (it then holds ``manifest.json`` with the sha256 of every array,
verified by `prepare_data()`) or the official MultiBench files (no manifest; arrays are shape-checked
only). As in MultiBench's ``get_dataloader``: image / 255 as (1, 28, 28), audio / 255 as (1, 112, 112),
train = the first ``num_train`` (55,000) train rows, validation = the remaining train rows, test = test.
Validation rows reuse the training speakers' clips (150 per digit, cycled over 60,000 rows), so audio
validation accuracy is optimistic (near 100% for a LeNet); the test speaker is unseen.

The audio arrays stay uint8 in memory (0.75 GB for train instead of 3 GB as float32); samples are
converted to float32 one at a time in `__getitem__`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fusionbench.data.avmnist_build import BUILD_COMMAND
from fusionbench.data.base import FusionDataModule, sha256_file
from fusionbench.errors import DatasetError

SHAPES = {"image": (784,), "audio": (112, 112)}  # per row, as stored
VIEWS = {"image": (1, 28, 28), "audio": (1, 112, 112)}  # per sample, as served
HOW_TO_GET = (
    f"Build it from MNIST + FSDD with `{BUILD_COMMAND}` (run from the repository root), or put the "
    "MultiBench files (avmnist.tar.gz from the MultiBench README, untarred: image/, audio/, "
    "train_labels.npy, test_labels.npy) in this folder."
)


class AVMNISTSplit(Dataset):
    """Rows ``rows`` of shared arrays, served in the batch contract with MultiBench's scaling."""

    def __init__(self, arrays: Mapping[str, np.ndarray], labels: np.ndarray, rows: range) -> None:
        self.arrays, self.labels, self.rows = dict(arrays), labels, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        j = self.rows[i]
        inputs = {
            m: torch.from_numpy(np.asarray(x[j], dtype=np.float32) / 255.0).reshape(VIEWS[m])
            for m, x in self.arrays.items()
        }
        return {"inputs": inputs, "target": torch.tensor(int(self.labels[j]), dtype=torch.int64)}


class AVMNISTDataModule(FusionDataModule):
    """AV-MNIST digit classification (10 classes) from an image and an audio spectrogram.

    Args:
        modalities: subset of ``[audio, image]`` (default both).
        num_train: train rows used for training; the rest of the train arrays is the validation
            split (MultiBench: 55,000 of 60,000). Fixtures with fewer rows set it smaller.
        num_samples: expected ``{"train": n, "test": n}`` rows; checked when given.
        mmap: memory-map the arrays instead of reading them (less RAM, slower first epoch).
        **kwargs: `FusionDataModule` arguments (``name`` defaults to ``avmnist``, ``batch_size``
            to 40 and ``monitor`` to ``val/acc``/``max`` as in MultiBench).
    """

    task_type = "multiclass"
    num_outputs = 10

    def __init__(
        self,
        modalities: Sequence[str] | None = None,
        num_train: int = 55000,
        num_samples: Mapping[str, int] | None = None,
        mmap: bool = False,
        **kwargs,
    ) -> None:
        kwargs.setdefault("name", "avmnist")
        kwargs.setdefault("batch_size", 40)
        kwargs.setdefault("monitor", {"metric": "val/acc", "mode": "max"})
        kwargs.setdefault("how_to_get", HOW_TO_GET)
        super().__init__(**kwargs)
        self.modalities = self.select_modalities(["audio", "image"], modalities)
        self.input_dims = {m: int(np.prod(SHAPES[m])) for m in self.modalities}
        self.num_train = int(num_train)
        self.num_samples = dict(num_samples or {})
        self.mmap = mmap
        self.manifest: dict | None = None

    def required_files(self) -> list[str]:
        arrays = [f"{m}/{s}_data.npy" for m in self.modalities for s in ("train", "test")]
        return ["train_labels.npy", "test_labels.npy", *arrays]

    def prepare_data(self) -> None:
        """Check the files exist and have the expected shapes; with a manifest, also that every
        array matches its recorded sha256 (the run record then stores the manifest's sha256)."""
        self.check_present()
        self._check_shapes()
        manifest_path = self.data_dir / "manifest.json"
        if manifest_path.is_file():
            try:
                self.manifest = json.loads(manifest_path.read_text())
                recorded = {f: self.manifest["files"][f]["sha256"] for f in self.required_files()}
            except (ValueError, KeyError, TypeError) as e:
                raise DatasetError(
                    f"{manifest_path} is unreadable or incomplete ({e!r}); rebuild with `{BUILD_COMMAND}`."
                ) from None
            bad = [
                f
                for f, h in recorded.items()
                if self.verify_checksums and sha256_file(self.data_dir / f) != h
            ]
            if bad:
                raise DatasetError(
                    f"AV-MNIST in {self.data_dir} is corrupt: {', '.join(bad)} do(es) not match the sha256 "
                    f"in manifest.json. Rebuild it with `{BUILD_COMMAND}` (or set "
                    "`dataset.verify_checksums=false` to run on deliberately modified arrays)."
                )
            self.data_checksum = sha256_file(manifest_path)
        else:  # official MultiBench files: identify them by their content
            digest = hashlib.sha256()
            for f in sorted(self.required_files()):
                digest.update(f.encode() + sha256_file(self.data_dir / f).encode())
            self.data_checksum = digest.hexdigest()

    def _open(self, name: str) -> np.ndarray:
        try:
            return np.load(self.data_dir / name, mmap_mode="r" if self.mmap else None, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise DatasetError(
                f"{self.data_dir / name} is not a readable .npy array ({e}). {self.how_to_get}"
            ) from None

    def _header(self, name: str) -> np.ndarray:
        """The array mapped, not read: its header and size (a truncated file fails here)."""
        try:
            return np.load(self.data_dir / name, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise DatasetError(
                f"{self.data_dir / name} is not a readable .npy array ({e}). {self.how_to_get}"
            ) from None

    def _check_shapes(self) -> None:
        """Row counts agree and every array has its MultiBench shape (read from the headers only)."""
        for split in ("train", "test"):
            labels = self._header(f"{split}_labels.npy")
            n = len(labels)
            if labels.ndim != 1 or (split in self.num_samples and n != self.num_samples[split]):
                want = self.num_samples.get(split, "N")
                raise DatasetError(
                    f"{self.data_dir / f'{split}_labels.npy'} has shape {labels.shape}, expected ({want},). "
                    + self.how_to_get
                )
            for m in self.modalities:
                name = f"{m}/{split}_data.npy"
                shape = self._header(name).shape
                if shape != (n, *SHAPES[m]):
                    raise DatasetError(
                        f"{self.data_dir / name} ({m}) has shape {shape}, expected {(n, *SHAPES[m])} "
                        f"(one row per label in {split}_labels.npy). {self.how_to_get}"
                    )

    def _load(self) -> None:
        labels = {s: self._open(f"{s}_labels.npy").astype(np.int64) for s in ("train", "test")}
        for s, y in labels.items():
            if y.size and (y.min() < 0 or y.max() > 9):
                raise DatasetError(
                    f"{self.data_dir / f'{s}_labels.npy'} has labels outside 0..9. {self.how_to_get}"
                )
        n_train = len(labels["train"])
        if not 0 < self.num_train < n_train:
            raise DatasetError(
                f"dataset.num_train={self.num_train} must leave both a training and a validation split of "
                f"the {n_train} train rows; use e.g. {max(1, n_train - n_train // 12)}."
            )
        arrays = {s: {m: self._open(f"{m}/{s}_data.npy") for m in self.modalities} for s in ("train", "test")}
        self.train_set = AVMNISTSplit(arrays["train"], labels["train"], range(self.num_train))
        self.val_set = AVMNISTSplit(arrays["train"], labels["train"], range(self.num_train, n_train))
        self.test_set = AVMNISTSplit(arrays["test"], labels["test"], range(len(labels["test"])))

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        if self.manifest is not None:
            p = self.manifest.get("params", {})
            out["build"] = {k: p.get(k) for k in ("seed", "noise_snr_db", "energy_kept")}
        else:
            out["build"] = "multibench files (no manifest)"
        return out

    @staticmethod
    def write(folder: Path, n_train: int = 60, n_test: int = 20, seed: int = 0) -> Path:
        """Write random arrays in the MultiBench layout (no manifest) with a learnable class signal in
        both modalities, e.g. fixtures for tests."""
        rng = np.random.default_rng(seed)
        folder = Path(folder)
        (folder / "image").mkdir(parents=True, exist_ok=True)
        (folder / "audio").mkdir(parents=True, exist_ok=True)
        protos = {m: rng.uniform(0, 255, size=(10, *SHAPES[m])) for m in SHAPES}
        for split, n in (("train", n_train), ("test", n_test)):
            y = rng.permutation(np.arange(n) % 10).astype(np.int64)
            np.save(folder / f"{split}_labels.npy", y)
            for m, dtype in (("image", np.float32), ("audio", np.uint8)):
                x = 0.6 * protos[m][y] + rng.uniform(0, 0.4 * 255, size=(n, *SHAPES[m]))
                np.save(folder / m / f"{split}_data.npy", np.clip(x, 0, 255).astype(dtype))
        return folder
