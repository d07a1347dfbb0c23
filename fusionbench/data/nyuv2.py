"""NYU Depth V2 (labeled subset) for 40-class RGB-D semantic segmentation (DynMM's fusion-level model on
ESANet), in the layout ESANet's ``src/datasets/nyuv2/prepare_dataset.py`` writes:

    <data_dir>/train.txt, test.txt        4-digit 1-based frame ids (795 / 654, from splits.mat)
    <data_dir>/{train,test}/rgb/NNNN.png          8-bit RGB, 640 x 480
    <data_dir>/{train,test}/depth/NNNN.png        uint16 millimetres (refined depth x 1000, truncated)
    <data_dir>/{train,test}/depth_raw/NNNN.png    uint16 millimetres (raw Kinect depth, 0 = no reading)
    <data_dir>/{train,test}/labels_{40,13}/NNNN.png   uint8 class ids, 0 = void
    <data_dir>/{train,test}/labels_894/NNNN.png   uint16 raw NYU class ids, 0 = unlabeled

`prepare_nyuv2` (``python scripts/prepare_data.py nyuv2 --from nyu_depth_v2_labeled.mat``) builds it
from the official HDF5 ``.mat`` one frame at a time, with the split and the 894 -> 40 -> 13 class maps of
the shipped ``data/nyuv2/*.mat`` files, staged in a hidden folder and moved into place only when complete;
it also writes ``SHA256SUMS`` (``sha256sum`` format, every file), which `NYUv2DataModule.prepare_data`
verifies. A layout written by ESANet's own script (no ``SHA256SUMS``) loads too, checked for presence only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fusionbench import ROOT, __version__
from fusionbench.data.avmnist_build import STAGING_OWNER, remove_stale_staging, swap_into_place
from fusionbench.data.base import FusionDataModule, sha256_file
from fusionbench.data.segmentation import (
    RGBDTrainAugment,
    class_pixel_counts,
    median_frequency_weights,
    read_depth,
    read_label,
    read_rgb,
    resize,
    write_png,
)
from fusionbench.errors import DatasetError

PREPARE_COMMAND = "python scripts/prepare_data.py nyuv2 --from nyu_depth_v2_labeled.mat"
HOW_TO_GET = (
    f"Prepare it from the official labeled file with `{PREPARE_COMMAND}` (nyu_depth_v2_labeled.mat, "
    "2.8 GB, from the NYU Depth V2 page cs.nyu.edu/~silberman/datasets/nyu_depth_v2.html), or point "
    "`dataset.data_dir` at a folder written by ESANet's src/datasets/nyuv2/prepare_dataset.py."
)
META_DIR = ROOT / "data" / "nyuv2"  # the shipped official metadata (splits and class maps)
META_FILES = ("splits.mat", "classMapping40.mat", "class13Mapping.mat", "classes.json", "PROVENANCE.md")
MANIFEST = "SHA256SUMS"
SPLITS = ("train", "test")
# ESANet's statistics of the 795 training images, in millimetres (src/datasets/nyuv2/pytorch_dataset.py);
# raw: over valid (non-zero) pixels, from the comment there (ESANet itself uses the refined numbers for both)
DEPTH_STATS = {
    "refined": (2841.94941272766, 1417.2594281672277),
    "raw": (2769.0187903686697, 1350.4174149841133),
}
DEPTH_DIRS = {"refined": "depth", "raw": "depth_raw"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAT_FIELDS = {  # what the official file holds, as h5py sees it (MATLAB stores arrays transposed)
    "images": "uint8 (N, 3, 640, 480): RGB frames",
    "depths": "float (N, 640, 480): in-painted depth in metres",
    "rawDepths": "float (N, 640, 480): raw Kinect depth in metres",
    "labels": "uint16 (N, 640, 480): NYU class ids 1..894, 0 = unlabeled",
}


# -- reading the prepared layout -------------------------------------------------------------------


def read_id_list(path: Path) -> list[str]:
    """Frame ids of a split list (one per line, ESANet's ``%04d``); blank lines are skipped."""
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    bad = [i for i in ids if "/" in i or "\\" in i or i.startswith(".") or " " in i]
    if bad:
        raise DatasetError(
            f"{path} lists {bad[:3]}, which are not frame ids (expected one id such as 0003 per line). "
            f"Re-create the folder with `{PREPARE_COMMAND}`."
        )
    dups = sorted({i for i in ids if ids.count(i) > 1})
    if dups:
        raise DatasetError(
            f"{path} lists frame ids more than once: {dups[:5]}. Re-create it with `{PREPARE_COMMAND}`."
        )
    return ids


class NYUv2Split(Dataset):
    """Frames ``ids`` of ``root/<folder>/``, read lazily from their PNGs and served in the batch contract:
    ``rgb`` (3, H, W) ImageNet-normalised, ``depth`` (1, H, W) normalised by ``depth_stats`` (raw depth:
    missing readings stay 0 after normalisation, as in ESANet), target (h, w) int64 with void = -1.

    ``augment`` (a `RGBDTrainAugment`) is applied when given; otherwise RGB (bilinear) and depth (nearest)
    are resized to ``size`` if they differ, and the label too (nearest) only when ``resize_label`` (training
    batches must share one size; evaluation keeps the label's own size and the task upsamples the logits).
    """

    def __init__(
        self,
        root: Path,
        folder: str,
        ids: Sequence[str],
        modalities: Sequence[str],
        num_classes: int,
        depth_mode: str,
        depth_stats: tuple[float, float],
        size: tuple[int, int],
        rgb_stats: tuple[Sequence[float], Sequence[float]] = (IMAGENET_MEAN, IMAGENET_STD),
        augment: RGBDTrainAugment | None = None,
        resize_label: bool = False,
    ) -> None:
        self.root, self.folder, self.ids = Path(root), folder, list(ids)
        self.modalities = list(modalities)
        self.num_classes, self.depth_mode = num_classes, depth_mode
        self.depth_mean, self.depth_std = (float(x) for x in depth_stats)
        self.size = (int(size[0]), int(size[1]))
        self.rgb_mean = torch.tensor(rgb_stats[0], dtype=torch.float32).view(3, 1, 1)
        self.rgb_std = torch.tensor(rgb_stats[1], dtype=torch.float32).view(3, 1, 1)
        self.augment, self.resize_label = augment, resize_label

    def __len__(self) -> int:
        return len(self.ids)

    def path(self, kind: str, frame: str) -> Path:
        """``kind``: rgb, depth, depth_raw, labels_40, ..."""
        return self.root / self.folder / kind / f"{frame}.png"

    def kinds(self) -> list[str]:
        """The sub-folders this split reads."""
        out = [f"labels_{self.num_classes}"]
        if "rgb" in self.modalities:
            out.append("rgb")
        if "depth" in self.modalities:
            out.append(DEPTH_DIRS[self.depth_mode])
        return out

    def load_label(self, frame: str) -> np.ndarray:
        path = self.path(f"labels_{self.num_classes}", frame)
        label = read_label(path)
        if label.size and int(label.max()) > self.num_classes:
            raise DatasetError(
                f"Label image {path} holds class id {int(label.max())}, but labels_{self.num_classes} may "
                f"hold only 0 (void) .. {self.num_classes}. The file is corrupt or from another label set; "
                f"re-create the folder with `{PREPARE_COMMAND}`."
            )
        return label

    def raw(self, i: int) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray]:
        """Frame ``i`` as stored: rgb (H, W, 3) uint8, depth (H, W) float32 mm, label (H, W) uint8."""
        frame = self.ids[i]
        rgb = read_rgb(self.path("rgb", frame)) if "rgb" in self.modalities else None
        depth = None
        if "depth" in self.modalities:
            depth = read_depth(self.path(DEPTH_DIRS[self.depth_mode], frame)).astype(np.float32)
        label = self.load_label(frame)
        for name, a in (("rgb", rgb), ("depth", depth)):
            if a is not None and a.shape[:2] != label.shape:
                raise DatasetError(
                    f"Frame {frame} of {self.root / self.folder}: {name} is {a.shape[:2]} but the label is "
                    f"{label.shape}; re-create the folder with `{PREPARE_COMMAND}`."
                )
        return rgb, depth, label

    def __getitem__(self, i: int) -> dict[str, Any]:
        rgb, depth, label = self.raw(i)
        h, w = self.size
        if self.augment is not None:
            rgb, depth, label = self.augment(rgb, depth, label)
        else:
            rgb = None if rgb is None else resize(rgb, h, w, "bilinear")
            depth = None if depth is None else resize(depth, h, w, "nearest")
            if self.resize_label:
                label = resize(label, h, w, "nearest")
        inputs = {}
        if rgb is not None:
            x = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0
            inputs["rgb"] = (x - self.rgb_mean) / self.rgb_std
        if depth is not None:
            d = torch.from_numpy(depth).unsqueeze(0)
            normed = (d - self.depth_mean) / self.depth_std
            inputs["depth"] = torch.where(d == 0, 0.0, normed) if self.depth_mode == "raw" else normed
        target = torch.from_numpy(label.astype(np.int64)) - 1
        return {"inputs": inputs, "target": target}


class NYUv2DataModule(FusionDataModule):
    """NYU Depth V2, 40-class (or 13-class) semantic segmentation from RGB and depth (module docstring).

    Args:
        modalities: subset of ``[depth, rgb]`` (default both).
        num_classes: 40 (``labels_40``, the benchmark's) or 13 (``labels_13``).
        depth_mode: ``refined`` (in-painted depth, ``depth/``; ESANet's default) or ``raw`` (``depth_raw/``).
        height, width: network input size (ESANet: 480 x 640, NYU's native size). Training crops to it;
            evaluation resizes RGB (bilinear) and depth (nearest) to it but keeps the label at its stored
            size, so metrics are computed at full resolution (the task upsamples the logits).
        augment: ESANet's training augmentation (`RGBDTrainAugment`); false: training images are only
            resized to the input size (labels with nearest).
        scale: the random rescale range of the augmentation.
        depth_mean, depth_std: depth normalisation in millimetres; None: ESANet's statistics of the training
            split for ``depth_mode`` (`DEPTH_STATS`).
        rgb_mean, rgb_std: RGB normalisation of [0, 1] values (ImageNet, as the pretrained encoders expect).
        val_fraction: 0 (default): validate on the test split, as ESANet and DynMM do (NYUv2 has no
            validation split). Otherwise that fraction of the training frames, drawn with ``val_seed``, is
            held out for validation (and left out of the class weights).
        class_weighting: ``median_frequency`` (ESANet) or None; computed on the training frames at setup
            and exposed as ``class_weights``, a (C,) float tensor.
        num_samples: expected ``{"train": n, "test": n}`` frames in the split lists (795 / 654); checked
            when given (null for a fixture or a custom split).
        **kwargs: `FusionDataModule` arguments (``name`` defaults to ``nyuv2``, ``batch_size`` to 8 and
            ``monitor`` to ``val/miou``/``max``). ``verify_checksums`` checks every file against
            ``SHA256SUMS`` when the folder has one.
    """

    task_type = "segmentation"

    def __init__(
        self,
        modalities: Sequence[str] | None = None,
        num_classes: int = 40,
        depth_mode: str = "refined",
        height: int = 480,
        width: int = 640,
        augment: bool = True,
        scale: Sequence[float] = (1.0, 1.4),
        depth_mean: float | None = None,
        depth_std: float | None = None,
        rgb_mean: Sequence[float] = IMAGENET_MEAN,
        rgb_std: Sequence[float] = IMAGENET_STD,
        val_fraction: float = 0.0,
        val_seed: int = 0,
        class_weighting: str | None = "median_frequency",
        num_samples: Mapping[str, int] | None = None,
        **kwargs,
    ) -> None:
        kwargs.setdefault("name", "nyuv2")
        kwargs.setdefault("batch_size", 8)
        kwargs.setdefault("monitor", {"metric": "val/miou", "mode": "max"})
        kwargs.setdefault("how_to_get", HOW_TO_GET)
        super().__init__(**kwargs)
        if num_classes not in (13, 40):
            raise DatasetError(
                f"dataset.num_classes must be 40 or 13 (labels_40 / labels_13), got {num_classes}."
            )
        if depth_mode not in DEPTH_DIRS:
            raise DatasetError(f"dataset.depth_mode must be 'refined' or 'raw', got {depth_mode!r}.")
        if not 0.0 <= val_fraction < 1.0:
            raise DatasetError(
                f"dataset.val_fraction must be in [0, 1) (0: validate on test), got {val_fraction}."
            )
        if class_weighting not in (None, "median_frequency"):
            raise DatasetError(
                f"dataset.class_weighting must be 'median_frequency' or null, got {class_weighting!r}."
            )
        if height < 1 or width < 1:
            raise DatasetError(f"dataset.height / dataset.width must be positive, got {height} x {width}.")
        self.modalities = self.select_modalities(["depth", "rgb"], modalities)
        self.num_outputs = self.num_classes = int(num_classes)
        self.depth_mode = depth_mode
        self.height, self.width = int(height), int(width)
        self.input_dims = {m: (3 if m == "rgb" else 1) * self.height * self.width for m in self.modalities}
        self.augment, self.scale = augment, tuple(scale)
        default_mean, default_std = DEPTH_STATS[depth_mode]
        self.depth_mean = float(default_mean if depth_mean is None else depth_mean)
        self.depth_std = float(default_std if depth_std is None else depth_std)
        if self.depth_std <= 0:
            raise DatasetError(f"dataset.depth_std must be positive, got {self.depth_std}.")
        self.rgb_mean, self.rgb_std = tuple(rgb_mean), tuple(rgb_std)
        self.val_fraction, self.val_seed = float(val_fraction), int(val_seed)
        self.class_weighting = class_weighting
        self.num_samples = dict(num_samples or {})
        self.class_weights: torch.Tensor | None = None
        self.manifest: dict[str, str] | None = None  # SHA256SUMS, once prepare_data() has read it
        self.ids: dict[str, list[str]] = {}

    def required_files(self) -> list[str]:
        return ["train.txt", "test.txt"]

    # -- guard ---------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Check the split lists, that every listed frame has the files this configuration reads, and,
        when the folder has ``SHA256SUMS`` (written by the prepare command), every file's sha256."""
        if not self.data_dir.is_dir():
            raise DatasetError(
                f"Dataset 'nyuv2': folder {self.data_dir} does not exist. {self.how_to_get} "
                "Point `paths.data_dir=DIR` (or FUSIONBENCH_DATA_DIR) at the folder that holds nyuv2/."
            )
        self.check_present()
        self.ids = {s: read_id_list(self.data_dir / f"{s}.txt") for s in SPLITS}
        for s, n in self.num_samples.items():
            if s in self.ids and len(self.ids[s]) != int(n):
                raise DatasetError(
                    f"{self.data_dir / f'{s}.txt'} lists {len(self.ids[s])} frames, expected {n} (the "
                    f"official split). Re-create the folder with `{PREPARE_COMMAND}`, or set "
                    "`dataset.num_samples=null` for a fixture or a custom split."
                )
        overlap = sorted(set(self.ids["train"]) & set(self.ids["test"]))
        if overlap:
            raise DatasetError(
                f"train.txt and test.txt in {self.data_dir} share frames {overlap[:5]}; the splits must be "
                f"disjoint. Re-create the folder with `{PREPARE_COMMAND}`."
            )
        for s in SPLITS:
            probe = self._split(s, self.ids[s])
            missing = [
                probe.path(k, f) for f in probe.ids for k in probe.kinds() if not probe.path(k, f).is_file()
            ]
            if missing:
                names = ", ".join(str(p.relative_to(self.data_dir)) for p in missing[:4])
                more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
                raise DatasetError(
                    f"{s}.txt in {self.data_dir} lists frames whose images are missing: {names}{more}. "
                    f"Re-create the folder with `{PREPARE_COMMAND}` (it writes every listed frame)."
                )
        manifest_path = self.data_dir / MANIFEST
        if manifest_path.is_file():
            self.manifest = read_manifest(manifest_path)
            if self.verify_checksums:
                bad = verify_manifest(self.data_dir, self.manifest)
                if bad:
                    raise DatasetError(
                        f"NYUv2 in {self.data_dir} does not match its {MANIFEST}: {_named(bad)}. Re-create "
                        f"it with `{PREPARE_COMMAND}` (or set `dataset.verify_checksums=false` to run on "
                        "deliberately modified files)."
                    )
            self.data_checksum = sha256_file(manifest_path)
        else:  # ESANet's own layout: identify the data by its split lists
            self.manifest = None
            digest = hashlib.sha256()
            for f in self.required_files():
                digest.update(f.encode() + sha256_file(self.data_dir / f).encode())
            self.data_checksum = digest.hexdigest()

    # -- loading -------------------------------------------------------------------------------
    def _split(self, split: str, ids: Sequence[str], train: bool = False) -> NYUv2Split:
        augment = None
        if train and self.augment:
            augment = RGBDTrainAugment(self.height, self.width, scale=self.scale)
        return NYUv2Split(
            self.data_dir,
            split,
            ids,
            self.modalities,
            self.num_classes,
            self.depth_mode,
            (self.depth_mean, self.depth_std),
            (self.height, self.width),
            rgb_stats=(self.rgb_mean, self.rgb_std),
            augment=augment,
            resize_label=train,
        )

    def _load(self) -> None:
        if not self.ids:
            self.ids = {s: read_id_list(self.data_dir / f"{s}.txt") for s in SPLITS}
        train_ids, val_ids = list(self.ids["train"]), None
        if self.val_fraction > 0:
            g = torch.Generator().manual_seed(self.val_seed)
            order = torch.randperm(len(train_ids), generator=g).tolist()
            n_val = max(1, int(round(self.val_fraction * len(train_ids))))
            if n_val >= len(train_ids):
                raise DatasetError(
                    f"dataset.val_fraction={self.val_fraction} leaves no training frames of {len(train_ids)}."
                )
            held = set(order[:n_val])
            val_ids = [f for k, f in enumerate(train_ids) if k in held]
            train_ids = [f for k, f in enumerate(train_ids) if k not in held]
        self.train_set = self._split("train", train_ids, train=True)
        self.val_set = (
            self._split("train", val_ids) if val_ids is not None else self._split("test", self.ids["test"])
        )
        self.test_set = self._split("test", self.ids["test"])
        if self.class_weighting == "median_frequency":
            self.class_weights = torch.from_numpy(self.compute_class_weights(self.train_set)).float()

    def compute_class_weights(self, split: NYUv2Split) -> np.ndarray:
        """Median-frequency weights (C,) over the stored (unaugmented) label maps of ``split``."""
        labels = (split.load_label(f) for f in split.ids)
        pixels, image_pixels = class_pixel_counts(labels, self.num_classes)
        return median_frequency_weights(pixels, image_pixels)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(
            num_classes=self.num_classes,
            depth_mode=self.depth_mode,
            input_size=[self.height, self.width],
            augment=self.augment,
            depth_stats=[self.depth_mean, self.depth_std],
            val="test split"
            if self.val_fraction == 0
            else f"{self.val_fraction:g} of train (seed {self.val_seed})",
            checked=MANIFEST if self.manifest is not None else "presence only (no SHA256SUMS)",
        )
        return out


# -- checksum manifest ------------------------------------------------------------------------------


def _named(items: Sequence[str], limit: int = 4) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def read_manifest(path: Path) -> dict[str, str]:
    """``{relative path: sha256}`` from a ``sha256sum``-format file."""
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name or name.startswith("/") or ".." in Path(name).parts:
            raise DatasetError(
                f"{path} line {n} is not '<sha256>  <relative path>': {line[:80]!r}. Re-create the "
                f"folder with `{PREPARE_COMMAND}`."
            )
        out[name] = digest.lower()
    return out


def verify_manifest(root: Path, manifest: Mapping[str, str]) -> list[str]:
    """Problems (missing or changed files) of ``root`` against ``manifest``."""
    bad = []
    for name, digest in sorted(manifest.items()):
        path = root / name
        if not path.is_file():
            bad.append(f"{name} missing")
        elif sha256_file(path) != digest:
            bad.append(f"{name} changed")
    return bad


def write_manifest(root: Path) -> Path:
    """Write ``root/SHA256SUMS`` over every other file below ``root`` (sorted, ``sha256sum -c`` format)."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
    lines = [f"{sha256_file(p)}  {p.relative_to(root).as_posix()}\n" for p in files]
    out = root / MANIFEST
    out.write_text("".join(lines))
    return out


# -- preparing the layout from the official .mat ----------------------------------------------------


def _loadmat(path: Path, what: str) -> dict:
    from scipy.io import loadmat

    try:
        return loadmat(path)
    except FileNotFoundError:
        raise DatasetError(f"{what} {path} does not exist; the official file ships in {META_DIR}.") from None
    except (ValueError, TypeError, OSError, NotImplementedError) as e:
        raise DatasetError(f"{what} {path} is not a readable MATLAB file ({e}).") from None


def _field(mat: Mapping, key: str, path: Path, holds: str) -> np.ndarray:
    if key not in mat:
        have = sorted(k for k in mat if not k.startswith("__"))
        raise DatasetError(f"{path} has no field '{key}' (it holds {have}); the official file holds {holds}.")
    return mat[key]


def _names(cells: np.ndarray) -> list[str]:
    return [str(np.asarray(c).ravel()[0]) if np.asarray(c).size else "" for c in np.asarray(cells).ravel()]


def read_splits(path: Path) -> dict[str, np.ndarray]:
    """``{"train": ids, "test": ids}``: 1-based frame indices from splits.mat (trainNdxs, testNdxs)."""
    mat = _loadmat(path, "Split file")
    out = {}
    for split, key in (("train", "trainNdxs"), ("test", "testNdxs")):
        ids = np.asarray(_field(mat, key, path, "trainNdxs (795 x 1) and testNdxs (654 x 1)")).ravel()
        out[split] = ids.astype(np.int64)
    both = np.concatenate(list(out.values()))
    if len(both) == 0 or both.min() < 1 or len(np.unique(both)) != len(both):
        raise DatasetError(
            f"{path}: trainNdxs / testNdxs must be distinct 1-based frame indices (min "
            f"{both.min(initial=0)}, {len(both) - len(np.unique(both))} repeated)."
        )
    return out


def read_class_maps(mapping40: Path, mapping13: Path) -> dict[str, Any]:
    """The 894 -> 40 and 40 -> 13 lookup tables (index 0 = void maps to 0) and the class names."""
    m40 = _loadmat(mapping40, "Class map")
    holds40 = "mapClass (1 x 894: raw id 1..894 -> 1..40), className (1 x 40), allClassName (1 x 894)"
    map40 = np.asarray(_field(m40, "mapClass", mapping40, holds40)).ravel().astype(np.int64)
    names40 = _names(_field(m40, "className", mapping40, holds40))
    names894 = (
        _names(m40["allClassName"])
        if "allClassName" in m40
        else [f"class{i}" for i in range(1, len(map40) + 1)]
    )
    m13 = _loadmat(mapping13, "Class map")
    holds13 = "a struct classMapping13 with labels13 (1 x 40: 40-class id -> 1..13) and classNames (1 x 13)"
    s = np.asarray(_field(m13, "classMapping13", mapping13, holds13)).ravel()[0]
    try:
        map13 = np.asarray(s["labels13"]).ravel().astype(np.int64)
        names13 = _names(s["classNames"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise DatasetError(f"{mapping13}: classMapping13 is not {holds13}.") from None
    if len(names40) != 40 or map40.min(initial=1) < 1 or map40.max(initial=1) > 40:
        raise DatasetError(
            f"{mapping40}: mapClass must map to 1..40 and className list 40 names ({holds40})."
        )
    if len(map13) != 40 or len(names13) != 13 or map13.min() < 1 or map13.max() > 13:
        raise DatasetError(f"{mapping13}: {holds13}; found {len(map13)} entries and {len(names13)} names.")
    return {
        "map894_40": np.concatenate([[0], map40]).astype(np.uint8),
        "map40_13": np.concatenate([[0], map13]).astype(np.uint8),
        "names": {894: names894, 40: names40, 13: names13},
    }


def open_labeled_mat(path: Path):
    """The official ``nyu_depth_v2_labeled.mat`` opened with h5py, checked for the fields and shapes the
    layout needs; returns ``(file, number of frames)``."""
    import h5py

    if not path.is_file():
        raise DatasetError(
            f"{path} does not exist; download nyu_depth_v2_labeled.mat (2.8 GB) from the NYU page."
        )
    if not h5py.is_hdf5(path):
        raise DatasetError(
            f"{path} is not an HDF5 file (MATLAB v7.3). The official nyu_depth_v2_labeled.mat is one, "
            "holding "
            + "; ".join(f"{k}: {v}" for k, v in MAT_FIELDS.items())
            + ". Re-download it (a truncated download or a re-saved v5 .mat is not readable here)."
        )
    f = h5py.File(path, "r")
    try:
        for key, holds in MAT_FIELDS.items():
            if key not in f or not isinstance(f[key], h5py.Dataset):
                raise DatasetError(
                    f"{path} has no dataset '{key}' (it holds {sorted(f.keys())}); the official file holds "
                    f"'{key}' as {holds}."
                )
        n, three, w, h = f["images"].shape if f["images"].ndim == 4 else (0, 0, 0, 0)
        if three != 3 or n == 0:
            raise DatasetError(
                f"{path}: 'images' is {f['images'].shape}; the official file holds {MAT_FIELDS['images']}."
            )
        for key in ("depths", "rawDepths", "labels"):
            if f[key].shape != (n, w, h):
                raise DatasetError(
                    f"{path}: '{key}' is {f[key].shape} but 'images' is {f['images'].shape}; expected "
                    f"({n}, {w}, {h}) ({MAT_FIELDS[key]})."
                )
    except BaseException:
        f.close()
        raise
    return f, n


def depth_to_mm(depth_m: np.ndarray) -> np.ndarray:
    """Metres -> uint16 millimetres, truncated as ESANet's ``(depth * 1e3).astype('uint16')`` (clipped first,
    so a value out of range saturates instead of wrapping)."""
    mm = np.nan_to_num(np.asarray(depth_m, dtype=np.float64) * 1e3, nan=0.0, posinf=65535.0, neginf=0.0)
    return np.clip(mm, 0, 65535).astype(np.uint16)


def _frame(f, index: int, maps: Mapping[str, Any], path: Path) -> dict[str, np.ndarray]:
    """Frame ``index`` (0-based) of the open .mat in the layout's arrays (transposed back to H x W)."""
    labels894 = np.asarray(f["labels"][index]).T
    if labels894.size and int(labels894.max()) >= len(maps["map894_40"]):
        raise DatasetError(
            f"{path}: frame {index + 1} has label id {int(labels894.max())}, beyond the "
            f"{len(maps['map894_40']) - 1} classes of classMapping40.mat."
        )
    labels40 = maps["map894_40"][labels894.astype(np.int64)]
    return {
        "rgb": np.ascontiguousarray(np.asarray(f["images"][index], dtype=np.uint8).transpose(2, 1, 0)),
        "depth": depth_to_mm(np.asarray(f["depths"][index]).T),
        "depth_raw": depth_to_mm(np.asarray(f["rawDepths"][index]).T),
        "labels_894": labels894.astype(np.uint16),
        "labels_40": labels40,
        "labels_13": maps["map40_13"][labels40],
    }


def prepare_nyuv2(
    mat_path: Path,
    data_root: Path,
    splits: Path | None = None,
    meta_dir: Path = META_DIR,
    name: str = "nyuv2",
    log: Callable[[str], None] = lambda msg: None,
) -> Path:
    """Write ESANet's layout for ``mat_path`` into ``data_root/name`` and return its path.

    The split comes from ``splits`` (default ``meta_dir/splits.mat``), the class maps from
    ``meta_dir/classMapping40.mat`` and ``class13Mapping.mat``; the metadata files used are copied into the
    layout. Frames are read one at a time (never the whole 2.8 GB array). Everything is written into a
    hidden ``.<name>-XXXXXXXX`` staging folder beside the target, ``SHA256SUMS`` last, and renamed into
    place only then; an existing target is replaced only after that. A failure or Ctrl-C / SIGTERM removes
    the staging folder; a killed run's leftovers are removed by the next one.
    """
    mat_path, data_root, meta_dir = Path(mat_path), Path(data_root), Path(meta_dir)
    splits = Path(splits) if splits is not None else meta_dir / "splits.mat"
    remove_stale_staging(data_root, name, log)
    ids = read_splits(splits)
    maps = read_class_maps(meta_dir / "classMapping40.mat", meta_dir / "class13Mapping.mat")
    f, n_frames = open_labeled_mat(mat_path)
    with f:
        too_big = [int(i) for s in SPLITS for i in ids[s] if i > n_frames]
        if too_big:
            raise DatasetError(
                f"{splits} names frames up to {max(too_big)}, but {mat_path} holds {n_frames}; use the split "
                "file that belongs to this .mat."
            )
        data_root.mkdir(parents=True, exist_ok=True)
        target = data_root / name
        with tempfile.TemporaryDirectory(dir=data_root, prefix=f".{name}-") as tmp:
            owner = {"host": socket.gethostname(), "pid": os.getpid()}  # see remove_stale_staging
            (Path(tmp) / STAGING_OWNER).write_text(json.dumps(owner) + "\n")
            staging = Path(tmp) / name
            staging.mkdir()
            kinds = ("rgb", "depth", "depth_raw", "labels_894", "labels_40", "labels_13")
            for s in SPLITS:
                for k in kinds:
                    (staging / s / k).mkdir(parents=True)
                for done, idx in enumerate(ids[s], 1):
                    arrays = _frame(f, int(idx) - 1, maps, mat_path)
                    for k in kinds:
                        write_png(staging / s / k / f"{int(idx):04d}.png", arrays[k])
                    if done % 100 == 0 or done == len(ids[s]):
                        log(f"{s}: {done} / {len(ids[s])} frames written")
                (staging / f"{s}.txt").write_text("".join(f"{int(i):04d}\n" for i in ids[s]))
            for c, names in maps["names"].items():
                (staging / f"class_names_1+{c}.txt").write_text("\n".join(["void", *names]) + "\n")
            meta_used = {"splits.mat": splits}
            meta_used.update({m: meta_dir / m for m in META_FILES if m != "splits.mat"})
            for dest, src in meta_used.items():
                if src.is_file():
                    shutil.copyfile(src, staging / dest)
            log(f"hashing the source {mat_path.name}")
            info = {
                "dataset": "nyuv2",
                "builder": "fusionbench.data.nyuv2.prepare_nyuv2",
                "command": f"python scripts/prepare_data.py nyuv2 --from {mat_path.name}"
                + ("" if splits == meta_dir / "splits.mat" else f" --splits {splits.name}"),
                "source": {
                    "file": mat_path.name,
                    "bytes": mat_path.stat().st_size,
                    "sha256": sha256_file(mat_path),
                },
                "metadata": {m: sha256_file(p) for m, p in meta_used.items() if p.is_file()},
                "frames": {s: len(ids[s]) for s in SPLITS},
                "frames_in_source": n_frames,
                "depth": "refined (depths) and raw (rawDepths) x 1000, truncated to uint16 millimetres",
                "labels": "labels_894 raw ids; labels_40 = mapClass[labels]; "
                "labels_13 = labels13[labels_40]; 0 = void",
                "versions": {"numpy": np.__version__, "fusionbench": __version__},
            }
            (staging / "prepare.json").write_text(json.dumps(info, indent=1) + "\n")
            write_manifest(staging)  # last: its presence marks a complete layout
            swap_into_place(staging, target, Path(tmp))
    return target
