"""Datamodule base: the batch contract, task description and the file guard.

Batch contract: ``{"inputs": {modality: Tensor}, "target": Tensor}``, optionally ``"meta": {key: Tensor}``
(per-sample facts that are neither input nor target, e.g. VQA answer types: the task hands them to the
metrics whose ``update`` takes those keys); modality keys are lowercase nouns, and every place where order
matters sorts them.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from fusionbench.errors import DatasetError

# the synthetic data's; VQA adds "vqa" (soft scores), the RGB-D datasets "segmentation" (per-pixel classes,
# void -1)
TASK_TYPES = ("multiclass", "multilabel", "regression")


class TensorDictDataset(Dataset):
    """In-memory dataset yielding ``{"inputs": {m: x[m][i]}, "target": y[i]}``."""

    def __init__(self, inputs: Mapping[str, torch.Tensor], target: torch.Tensor) -> None:
        sizes = {m: len(x) for m, x in inputs.items()}
        if any(n != len(target) for n in sizes.values()):
            raise DatasetError(
                f"Modalities and targets have different sample counts: {sizes}, target {len(target)}."
            )
        self.inputs = dict(inputs)
        self.target = target

    def __len__(self) -> int:
        return len(self.target)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"inputs": {m: x[i] for m, x in self.inputs.items()}, "target": self.target[i]}


def read_pickle(path: Path, how_to_get: str) -> Any:
    """A pickle's object (latin1 retried for a file written by Python 2's numpy); a `DatasetError` naming the
    file and how to get it when it cannot be read."""
    for encoding in ("ASCII", "latin1"):
        try:
            with open(path, "rb") as f:
                return pickle.load(f, encoding=encoding)
        except UnicodeDecodeError:
            continue
        except (
            pickle.UnpicklingError,
            EOFError,
            AttributeError,
            ImportError,
            IndexError,
            ValueError,
            TypeError,
        ) as e:
            raise DatasetError(
                f"{path} is not a readable pickle ({type(e).__name__}: {e}). {how_to_get}"
            ) from None
    raise DatasetError(f"{path} is not a readable pickle (no text encoding decodes it). {how_to_get}")


def split_dict(data: Any, path: Path, keys: Sequence[str], layout: str, how_to_get: str) -> Mapping:
    """``data`` checked to be a dict holding every split key (``keys``) of ``layout``'s pickle."""
    names = ", ".join(f"'{k}'" for k in keys)
    if not isinstance(data, Mapping):
        raise DatasetError(
            f"{path} holds a {type(data).__name__}; expected {layout}: a dict with keys {names}. {how_to_get}"
        )
    missing = [k for k in keys if k not in data]
    if missing:
        raise DatasetError(
            f"{path} has no split(s) {missing}; it holds keys {sorted(map(str, data))}, expected {names} "
            f"({layout}). {how_to_get}"
        )
    return data


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def git_blob_id(path: Path) -> str:
    """What `git hash-object FILE` prints (sources like MOGONET publish these ids)."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def verify_checksum(path: Path, expected: str) -> str | None:
    """Check ``expected`` (``sha256:<hex>`` or ``git:<blob id>``); return a problem description or None."""
    kind, _, value = expected.partition(":")
    if kind == "sha256":
        actual = sha256_file(path)
    elif kind == "git":
        actual = git_blob_id(path)
    else:
        raise ValueError(
            f"Unknown checksum kind {kind!r} for {path.name}; use 'sha256:<hex>' or 'git:<blob id>'."
        )
    return None if actual == value else f"{path.name}: {kind} is {actual}, expected {value}"


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (keep, held_out) with ``fraction`` of every class held out (at least one
    sample of each class that has two or more)."""
    if not 0.0 <= fraction < 1.0:
        raise DatasetError(f"Validation fraction must be in [0, 1), got {fraction}.")
    g = torch.Generator().manual_seed(seed)
    keep, held = [], []
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n = int(round(fraction * len(idx)))
        if fraction > 0 and n == 0 and len(idx) > 1:
            n = 1
        held.append(idx[:n])
        keep.append(idx[n:])
    return torch.sort(torch.cat(keep)).values, torch.sort(torch.cat(held)).values


class UnpaddedDistributedSampler(DistributedSampler):
    """Evaluation shards without padding: rank r reads samples r, r + W, r + 2W, ... of W ranks, so every
    sample is evaluated exactly once (shards differ in length by at most one). Lightning's own
    `DistributedSampler` pads the split with up to W - 1 repeated samples, which the epoch's metrics would
    count twice. Being a `DistributedSampler`, Lightning keeps it instead of injecting its own."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self):
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


class FusionDataModule(pl.LightningDataModule):
    """Base for every dataset.

    Subclasses set, by the end of `setup()`: ``task_type`` (one of `TASK_TYPES`, ``vqa`` or
    ``segmentation``), ``num_outputs``, ``modalities`` (sorted), ``input_dims`` (features per modality,
    flattened) and the datasets ``train_set``, ``val_set``, ``test_set``. They implement `required_files()`
    for the guard and `_load()` for the data.

    Args:
        name: dataset name used in messages and run records.
        data_dir: folder holding the files.
        batch_size: samples per batch; 0 or less means the whole split in one batch.
        num_workers: DataLoader workers.
        monitor: ``{"metric": "val/loss", "mode": "min"}``, the metric checkpoints select on.
        checksums: file name -> ``sha256:<hex>`` or ``git:<blob id>``, verified by `prepare_data()`.
        verify_checksums: set false to run on locally modified files.
        how_to_get: sentence shown when files are missing.
    """

    task_type: str
    num_outputs: int
    modalities: list[str]
    input_dims: dict[str, int]

    def __init__(
        self,
        name: str,
        data_dir: str | Path,
        batch_size: int = 64,
        num_workers: int = 0,
        monitor: Mapping[str, str] | None = None,
        checksums: Mapping[str, str] | None = None,
        verify_checksums: bool = True,
        how_to_get: str = "",
    ) -> None:
        super().__init__()
        self.name = name
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.monitor = dict(monitor or {"metric": "val/loss", "mode": "min"})
        if self.monitor.get("mode") not in ("min", "max"):
            raise DatasetError(f"monitor.mode must be 'min' or 'max', got {self.monitor.get('mode')!r}.")
        self.checksums = dict(checksums or {})
        self.verify_checksums = verify_checksums
        self.how_to_get = how_to_get
        self._loaded = False
        self.data_checksum: str | None = None

    # -- guard -------------------------------------------------------------------------------
    def required_files(self) -> list[str]:
        return []

    def check_present(self) -> None:
        """Raise a `DatasetError` naming every required file that is missing and how to get it."""
        missing = [f for f in self.required_files() if not (self.data_dir / f).is_file()]
        if missing:
            raise DatasetError(
                f"Dataset '{self.name}' is incomplete: {len(missing)} file(s) missing in {self.data_dir} "
                f"({', '.join(missing)}). {self.how_to_get} "
                "Point `paths.data_dir=DIR` (or FUSIONBENCH_DATA_DIR) at the folder that holds it."
            )

    def prepare_data(self) -> None:
        """Check files exist and match their checksums; never downloads."""
        self.check_present()
        digest = hashlib.sha256()
        problems = []
        for f in sorted(self.required_files()):
            path = self.data_dir / f
            digest.update(f.encode() + sha256_file(path).encode())
            if self.verify_checksums and f in self.checksums:
                problem = verify_checksum(path, self.checksums[f])
                if problem:
                    problems.append(problem)
        if problems:
            raise DatasetError(
                f"Dataset '{self.name}' in {self.data_dir} does not match the published files: "
                + "; ".join(problems)
                + f". Re-obtain the files ({self.how_to_get}) or, to run on deliberately modified files, "
                "set `dataset.verify_checksums=false`."
            )
        self.data_checksum = digest.hexdigest()

    # -- loading -----------------------------------------------------------------------------
    def _load(self) -> None:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if not self._loaded:
            if self.data_checksum is None:
                self.prepare_data()
            self._load()
            self._loaded = True

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        bs = self.batch_size if self.batch_size > 0 else len(dataset)
        sampler = None
        if not shuffle and torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            if world > 1:  # evaluation under DDP: every sample once (training shards come from Lightning)
                sampler = UnpaddedDistributedSampler(dataset, world, torch.distributed.get_rank())
        return DataLoader(
            dataset,
            batch_size=bs,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def robustness_set(self, corrupt: Callable[[Mapping[str, torch.Tensor], int], dict]) -> Dataset:
        """The test split with ``corrupt(inputs, index)`` applied to every sample
        (`fusionbench.robustness`). Datasets with a per-sample transform override this to corrupt before it
        (stocks: before quantising)."""
        from fusionbench.robustness import CorruptedDataset

        return CorruptedDataset(self.test_set, corrupt)

    def select_modalities(self, available: Sequence[str], wanted: Sequence[str] | None) -> list[str]:
        wanted = list(available) if wanted is None else list(wanted)
        unknown = [m for m in wanted if m not in available]
        if unknown or not wanted:
            raise DatasetError(
                f"Dataset '{self.name}' has modalities {list(available)}; cannot select {wanted}. "
                f"Set `dataset.modalities` to a non-empty subset of {list(available)}."
            )
        return sorted(wanted)

    def describe(self) -> dict[str, Any]:
        """What a run record stores about the data."""
        return {
            "name": self.name,
            "modalities": self.modalities,
            "input_dims": self.input_dims,
            "sizes": {s: len(getattr(self, f"{s}_set")) for s in ("train", "val", "test")},
            "checksum": self.data_checksum,
        }
