"""MM-IMDB in MultiBench's HDF5 layout (DEQ, DynMM; MultiBench ``datasets/imdb``, Arevalo et al. 2017).

One file, ``multimodal_imdb.hdf5``, written by ``johnarevalo/gmu-mmimdb`` ``make_dataset.py`` (a Fuel
``H5PYDataset``). Rows are ordered train, then dev, then test. The datasets this loader reads:

| dataset | shape | dtype | modality |
| --- | --- | --- | --- |
| ``vgg_features`` | (25959, 4096) | float32 | ``image``: VGG-16 features of the poster |
| ``features`` | (25959, 300) | float32 | ``text``: mean GoogleNews word2vec of the plot |
| ``genres`` | (25959, 23) | int32 | target: multi-hot genres, attribute ``target_names`` (JSON list) |

The file also holds ``images`` (25959, 3, 256, 160) int32 posters (about 12 GB; never read here),
``sequences``, ``three_grams``, ``word_grams`` and ``imdb_ids``, and the root attribute ``split``
(Fuel's split array: ``split``/``source``/``start``/``stop`` rows).

Splits, as MultiBench's ``get_dataloader`` (index ranges, no shuffling of rows): train ``[0, 15552)``,
validation ``[15552, 18160)`` (2,608), test ``[18160, 25959)`` (7,799); ``num_samples`` sets the three
sizes (consecutive ranges from row 0). When the file's ``split`` attribute describes other ranges
(for ``genres``), a warning says so. Task: 23 genres, multi-label (``multilabel``: BCE on logits,
micro / macro F1 at threshold 0.5); checkpoints are selected on validation macro-F1 as in MultiBench.

Non-finite feature values: MultiBench does not clean MM-IMDB (a plot without any word2vec word would
give a NaN mean). By default they stop the run with a `DatasetError` naming the dataset, the count and
the first rows; ``nonfinite="zero"`` replaces them with 0 (counted in the run record).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from fusionbench.data.base import FusionDataModule, TensorDictDataset
from fusionbench.errors import DatasetError

log = logging.getLogger("fusionbench")

FILE = "multimodal_imdb.hdf5"
DATASETS = {"image": "vgg_features", "text": "features"}  # modality -> HDF5 dataset
DIMS = {"image": 4096, "text": 300}
NUM_GENRES = 23
SPLITS = {"train": 15552, "val": 2608, "test": 7799}  # MultiBench's index ranges, in this order
FILE_SPLIT_NAMES = {"train": "train", "val": "dev", "test": "test"}  # ours -> Fuel's split names
GENRES = (  # the order commonly hard-coded elsewhere; the loader uses the file's target_names
    "Drama",
    "Comedy",
    "Romance",
    "Thriller",
    "Crime",
    "Action",
    "Adventure",
    "Horror",
    "Documentary",
    "Mystery",
    "Sci-Fi",
    "Fantasy",
    "Family",
    "Biography",
    "War",
    "History",
    "Music",
    "Animation",
    "Musical",
    "Western",
    "Sport",
    "Short",
    "Film-Noir",
)
HOW_TO_GET = (
    "Download multimodal_imdb.hdf5 (archive.org item 'mmimdb', linked from the README of "
    "johnarevalo/gmu-mmimdb and from MultiBench's MM-IMDB instructions; several GB) and put it in this "
    "folder; fusionbench never downloads it."
)
NONFINITE = ("error", "zero")


def check_sizes(num_samples: Mapping[str, Any], splits: Sequence[str], what: str) -> dict[str, int]:
    """``{"train": n, "val": n, "test": n}`` with positive integers, else a `DatasetError`."""
    keys = sorted(num_samples)
    if keys != sorted(splits):
        raise DatasetError(f"dataset.num_samples must give exactly {list(splits)} {what}, got keys {keys}.")
    out = {}
    for s in splits:
        n = num_samples[s]
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise DatasetError(f"dataset.num_samples.{s} must be a positive integer, got {n!r}.")
        out[s] = int(n)
    return out


def fuel_splits(attrs: h5py.AttributeManager, source: str = "genres") -> dict[str, tuple[int, int]] | None:
    """``{split: (start, stop)}`` of ``source`` from Fuel's root ``split`` attribute, or None when absent."""
    arr = attrs.get("split")
    names = getattr(getattr(arr, "dtype", None), "names", None) or ()
    if not {"split", "source", "start", "stop"} <= set(names):
        return None

    def text(v: Any) -> str:
        return v.decode("utf-8") if isinstance(v, bytes) else str(v)

    out = {}
    for row in np.atleast_1d(arr):
        if text(row["source"]) == source and ("available" not in names or bool(row["available"])):
            out[text(row["split"])] = (int(row["start"]), int(row["stop"]))
    return out or None


class MMIMDBDataModule(FusionDataModule):
    """Movie genre prediction (23 genres, multi-label) from the poster's VGG-16 features and the plot's
    mean word2vec.

    Args:
        file: the HDF5 file's name in ``data_dir``.
        modalities: subset of ``[image, text]`` (default both).
        num_samples: ``{"train": n, "val": n, "test": n}``, the sizes of the consecutive row ranges from
            row 0 (default MultiBench's 15,552 / 2,608 / 7,799); a fixture with fewer rows sets them smaller.
        num_labels: genre columns expected in ``genres`` (23).
        nonfinite: ``error`` (default) stops on NaN/inf features; ``zero`` replaces them with 0.
        **kwargs: `FusionDataModule` arguments (``name`` defaults to ``mmimdb``, ``batch_size`` to 128 as
            DynMM, ``monitor`` to ``val/f1_macro``/``max`` as MultiBench's multilabel selection).
    """

    task_type = "multilabel"

    def __init__(
        self,
        file: str = FILE,
        modalities: Sequence[str] | None = None,
        num_samples: Mapping[str, int] | None = None,
        num_labels: int = NUM_GENRES,
        nonfinite: str = "error",
        **kwargs,
    ) -> None:
        kwargs.setdefault("name", "mmimdb")
        kwargs.setdefault("batch_size", 128)
        kwargs.setdefault("monitor", {"metric": "val/f1_macro", "mode": "max"})
        kwargs.setdefault("how_to_get", HOW_TO_GET)
        super().__init__(**kwargs)
        if nonfinite not in NONFINITE:
            raise DatasetError(f"dataset.nonfinite must be one of {NONFINITE}, got {nonfinite!r}.")
        self.file = str(file)
        self.modalities = self.select_modalities(sorted(DATASETS), modalities)
        self.input_dims = {m: DIMS[m] for m in self.modalities}
        self.num_samples = check_sizes(
            num_samples or SPLITS, list(SPLITS), "row counts (consecutive ranges from row 0)"
        )
        self.num_outputs = int(num_labels)
        self.nonfinite = nonfinite
        self.info: dict[str, Any] = {}

    @property
    def path(self) -> Path:
        return self.data_dir / self.file

    def ranges(self) -> dict[str, tuple[int, int]]:
        """``{split: (start, stop)}``: consecutive row ranges in the order train, val, test."""
        out, start = {}, 0
        for s in SPLITS:
            out[s] = (start, start + self.num_samples[s])
            start += self.num_samples[s]
        return out

    # -- guard -------------------------------------------------------------------------------
    def required_files(self) -> list[str]:
        return [self.file]

    def prepare_data(self) -> None:
        """File present, datasets with MultiBench's names and shapes (headers only), then the base
        guard (content hash for the record, checksums when configured)."""
        self.check_present()
        self._check_layout()
        super().prepare_data()

    def _open(self) -> h5py.File:
        try:
            return h5py.File(self.path, "r")
        except OSError as e:
            raise DatasetError(f"{self.path} is not a readable HDF5 file ({e}). {self.how_to_get}") from None

    def _check_layout(self) -> None:
        with self._open() as f:
            wanted = {"genres": (self.num_outputs, "multi-hot genres")}
            wanted.update({DATASETS[m]: (DIMS[m], f"{m} features") for m in self.modalities})
            rows = {}
            for key, (width, what) in wanted.items():
                if key not in f or not isinstance(f[key], h5py.Dataset):
                    raise DatasetError(
                        f"{self.path} has no dataset '{key}' ({what}, expected shape (N, {width})); it holds "
                        f"{sorted(f.keys())}. Is it MultiBench's multimodal_imdb.hdf5? {self.how_to_get}"
                    )
                shape = f[key].shape
                if len(shape) != 2 or shape[1] != width:
                    raise DatasetError(
                        f"{self.path}: dataset '{key}' ({what}) has shape {shape}, expected (N, {width}). "
                        f"{self.how_to_get}"
                    )
                rows[key] = shape[0]
            if len(set(rows.values())) > 1:
                raise DatasetError(
                    f"{self.path}: datasets have different row counts {rows}; they must be equal. "
                    f"{self.how_to_get}"
                )
            n = next(iter(rows.values()))
            need = sum(self.num_samples.values())
            if need > n:
                sizes = ", ".join(f"{s} {k}" for s, k in self.num_samples.items())
                raise DatasetError(
                    f"{self.path} has {n} rows but dataset.num_samples asks for {need} ({sizes}; consecutive "
                    "ranges from row 0). Set `dataset.num_samples` to sizes that fit (MultiBench's file: "
                    "15552 / 2608 / 7799)."
                )
            names = f["genres"].attrs.get("target_names")
            try:
                genres = list(json.loads(names)) if names is not None else None
            except (TypeError, ValueError):
                genres = None
            file_splits = fuel_splits(f.attrs)
        expected = {FILE_SPLIT_NAMES[s]: r for s, r in self.ranges().items()}
        if file_splits is not None and {k: file_splits.get(k) for k in expected} != expected:
            log.warning(
                "mmimdb: the file's split attribute gives %s for 'genres', but dataset.num_samples "
                "selects %s.",
                file_splits,
                expected,
            )
        self.info = {"rows": n, "genres": genres, "ranges": self.ranges(), "file_splits": file_splits}

    # -- loading -----------------------------------------------------------------------------
    def _load(self) -> None:
        if not self.info:
            self._check_layout()
        n = sum(self.num_samples.values())
        with self._open() as f:
            genres = np.asarray(f["genres"][:n])
            features = {m: np.asarray(f[DATASETS[m]][:n], dtype=np.float32) for m in self.modalities}
        if not np.isin(genres, (0, 1)).all():
            bad = np.unique(genres[~np.isin(genres, (0, 1))])[:5]
            raise DatasetError(
                f"{self.path}: dataset 'genres' must be multi-hot (0/1), found values {bad.tolist()}. "
                f"{self.how_to_get}"
            )
        replaced = {}
        for m, x in features.items():
            bad = ~np.isfinite(x)
            if bad.any():
                rows = np.flatnonzero(bad.any(axis=1))
                if self.nonfinite == "error":
                    raise DatasetError(
                        f"{self.path}: dataset '{DATASETS[m]}' ({m}) has {int(bad.sum())} NaN/inf value(s) "
                        f"in {len(rows)} row(s), first rows {rows[:5].tolist()}. MultiBench does not clean "
                        "MM-IMDB; set `dataset.nonfinite=zero` to replace them with 0, or re-obtain the file."
                    )
                x[bad] = 0.0
                replaced[m] = int(bad.sum())
                log.warning("mmimdb: replaced %d NaN/inf value(s) of '%s' with 0.", replaced[m], DATASETS[m])
        self.info["nonfinite_replaced"] = replaced
        inputs = {m: torch.from_numpy(x) for m, x in features.items()}
        target = torch.from_numpy(genres.astype(np.float32))
        sets = {}
        for s, (a, b) in self.ranges().items():
            sets[s] = TensorDictDataset({m: x[a:b] for m, x in inputs.items()}, target[a:b])
        self.train_set, self.val_set, self.test_set = sets["train"], sets["val"], sets["test"]

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["mmimdb"] = {
            k: self.info.get(k) for k in ("rows", "ranges", "file_splits", "genres", "nonfinite_replaced")
        }
        return out


def write_fixture(
    folder: Path,
    sizes: Mapping[str, int] | None = None,
    seed: int = 0,
    file: str = FILE,
) -> Path:
    """Write ``folder/file`` in gmu-mmimdb's ``make_dataset.py`` layout with ``sizes`` rows per split
    (default 24 / 8 / 8), e.g. fixtures for tests; returns ``folder``.

    Same dataset names, dtypes, widths, attributes (``target_names``, dimension labels, Fuel's ``split``
    array) as the real file; ``images`` is created but left unwritten (HDF5 stores no chunk for it, so
    it reads as zeros and costs no space); ``three_grams`` / ``word_grams`` are narrower than the real
    ones (their widths depend on the corpus). Genres depend on the features (a learnable signal).
    """
    sizes = check_sizes(sizes or {"train": 24, "val": 8, "test": 8}, list(SPLITS), "row counts")
    rng = np.random.default_rng(seed)
    n = sum(sizes.values())
    genres = (rng.random((n, NUM_GENRES)) < 0.2).astype(np.int32)
    genres[np.arange(n), rng.integers(0, NUM_GENRES, n)] = 1  # every movie has at least one genre
    text = genres @ rng.normal(size=(NUM_GENRES, DIMS["text"])) * 0.1 + rng.normal(0, 0.05, (n, DIMS["text"]))
    image = np.maximum(genres @ rng.normal(size=(NUM_GENRES, DIMS["image"])), 0) + rng.random(
        (n, DIMS["image"])
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / file, "w") as f:
        f.create_dataset("features", data=text.astype(np.float32))
        f.create_dataset("vgg_features", data=image.astype(np.float32))
        f.create_dataset("three_grams", data=rng.random((n, 16)).astype(np.float32))
        f.create_dataset("word_grams", data=rng.random((n, 8)).astype(np.float32))
        f.create_dataset("images", (n, 3, 256, 160), dtype="int32", chunks=(1, 3, 256, 160))
        seqs = f.create_dataset("sequences", (n,), dtype=h5py.vlen_dtype(np.dtype("int32")))
        for i in range(n):
            seqs[i] = rng.integers(1, 1000, int(rng.integers(3, 12))).astype(np.int32)
        g = f.create_dataset("genres", data=genres)
        g.attrs["target_names"] = json.dumps(list(GENRES))
        f.create_dataset("imdb_ids", data=np.array([f"{i:07d}" for i in range(n)], dtype="S7"))
        for key in ("features", "vgg_features", "three_grams", "word_grams", "genres"):
            f[key].dims[0].label = "batch"
            f[key].dims[1].label = "classes" if key == "genres" else "features"
        f["imdb_ids"].dims[0].label = "batch"
        for axis, label in enumerate(("batch", "channel", "height", "width")):
            f["images"].dims[axis].label = label
        f.attrs["split"] = _fuel_split_array(sizes, sorted(f.keys()))
    return folder


def _fuel_split_array(sizes: Mapping[str, int], sources: Sequence[str]) -> np.ndarray:
    """Fuel's ``H5PYDataset.create_split_array`` for consecutive train / dev / test ranges of every source."""
    starts = np.cumsum([0] + [sizes[s] for s in SPLITS])
    names = [FILE_SPLIT_NAMES[s] for s in SPLITS]
    dtype = np.dtype(
        [
            ("split", f"S{max(map(len, names))}"),
            ("source", f"S{max(map(len, sources))}"),
            ("start", np.int64),
            ("stop", np.int64),
            ("indices", h5py.ref_dtype),
            ("available", np.bool_),
            ("comment", "S1"),
        ]
    )
    arr = np.empty(len(names) * len(sources), dtype=dtype)
    i = 0
    for k, split in enumerate(names):
        for source in sources:
            arr[i] = (split.encode(), source.encode(), starts[k], starts[k + 1], h5py.Reference(), True, b".")
            i += 1
    return arr
