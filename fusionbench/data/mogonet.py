"""Multi-omics datasets in MOGONET layout: BRCA (DEQ paper, Table 1) and ROSMAP.

One flat folder per dataset: ``{v}_tr.csv`` / ``{v}_te.csv`` per view v (no header, one sample per
row), ``labels_tr.csv`` / ``labels_te.csv`` (one float label per line). Row i of every train file
is the same patient. Like MM-Dynamics, every feature is min-max scaled with statistics fitted on
training rows only; unlike it, a stratified validation split is carved from the training rows
(MOGONET and MM-Dynamics have none, and the public DEQ code selects its checkpoint on the test set;
``selection="test"`` reproduces that, explicitly).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fusionbench.data.base import FusionDataModule, TensorDictDataset, stratified_split
from fusionbench.errors import DatasetError


class MogonetDataModule(FusionDataModule):
    """MOGONET-layout multi-omics classification.

    Args:
        views: modality name -> view number in the file names (``{"mrna": 1, "meth": 2, "mirna": 3}``).
        num_classes: number of classes; labels must be integers in ``[0, num_classes)``.
        modalities: subset of ``views`` to load (default all), e.g. ``[mrna, meth]``.
        feature_dims: expected columns per modality; a file with other widths is rejected.
        num_samples: expected ``{"train": n, "test": n}`` rows; checked when given.
        val_fraction: share of each class of the training rows held out for validation.
        split_seed: seed of that split (fixed by default so seeds vary only the model).
        selection: ``"val"`` (default) selects checkpoints on the held-out split; ``"test"`` uses the
            test split as validation set, as the public BRCA code does (paper-faithful, optimistic).
        scale: min-max scale each feature with training statistics (MM-Dynamics preprocessing).
        **kwargs: `FusionDataModule` arguments.
    """

    task_type = "multiclass"

    def __init__(
        self,
        views: Mapping[str, int],
        num_classes: int,
        modalities: Sequence[str] | None = None,
        feature_dims: Mapping[str, int] | None = None,
        num_samples: Mapping[str, int] | None = None,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        selection: str = "val",
        scale: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if selection not in ("val", "test"):
            raise DatasetError(f"dataset.selection must be 'val' or 'test', got {selection!r}.")
        self.views = dict(views)
        self.num_outputs = self.num_classes = int(num_classes)
        self.modalities = self.select_modalities(list(self.views), modalities)
        self.feature_dims = dict(feature_dims or {})
        self.num_samples = dict(num_samples or {})
        self.val_fraction = val_fraction if selection == "val" else 0.0
        self.split_seed = split_seed
        self.selection = selection
        self.scale = scale
        self.input_dims = {m: self.feature_dims[m] for m in self.modalities if m in self.feature_dims}

    def required_files(self) -> list[str]:
        files = ["labels_tr.csv", "labels_te.csv"]
        for m in self.modalities:
            files += [f"{self.views[m]}_tr.csv", f"{self.views[m]}_te.csv"]
        return files

    def _read_matrix(self, name: str) -> np.ndarray:
        path = self.data_dir / name
        try:
            x = pd.read_csv(path, header=None, dtype=np.float64).to_numpy()
        except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
            raise DatasetError(
                f"{path} is not a MOGONET matrix (comma-separated floats, no header): {e}. "
                "Re-obtain the file; see the dataset's PROVENANCE.md."
            ) from None
        if not np.isfinite(x).all():
            raise DatasetError(f"{path} contains NaN or infinite values; re-obtain the file.")
        return x

    def _read_labels(self, split: str) -> np.ndarray:
        path = self.data_dir / f"labels_{split}.csv"
        y = self._read_matrix(path.name).reshape(-1)
        if not np.all(y == np.round(y)) or y.min() < 0 or y.max() >= self.num_classes:
            bad = sorted(set(y[(y != np.round(y)) | (y < 0) | (y >= self.num_classes)].tolist()))[:5]
            raise DatasetError(
                f"{path} has labels outside the integers 0..{self.num_classes - 1} (e.g. {bad}). "
                f"Check `dataset.num_classes` ({self.num_classes}) or re-obtain the file."
            )
        expected = self.num_samples.get("train" if split == "tr" else "test")
        if expected is not None and len(y) != expected:
            raise DatasetError(
                f"{path} has {len(y)} labels, expected {expected}; the file is truncated or wrong."
            )
        return y.astype(np.int64)

    def _load(self) -> None:
        y_tr, y_te = self._read_labels("tr"), self._read_labels("te")
        x_tr, x_te = {}, {}
        for m in self.modalities:
            for split, y, out in (("tr", y_tr, x_tr), ("te", y_te, x_te)):
                name = f"{self.views[m]}_{split}.csv"
                x = self._read_matrix(name)
                if x.shape[0] != len(y):
                    raise DatasetError(
                        f"{self.data_dir / name} has {x.shape[0]} rows but labels_{split}.csv has {len(y)}: "
                        "rows must be the same samples in the same order. Re-obtain the file."
                    )
                want = self.feature_dims.get(m)
                if want is not None and x.shape[1] != want:
                    raise DatasetError(
                        f"{self.data_dir / name} ({m}) has {x.shape[1]} columns, expected {want}. "
                        "Re-obtain the file, or fix `dataset.feature_dims` if this is a different release."
                    )
                out[m] = x
        target_tr = torch.from_numpy(y_tr)
        train_idx, val_idx = stratified_split(target_tr, self.val_fraction, self.split_seed)
        inputs_tr, inputs_te = {}, {}
        for m in self.modalities:
            xt, xe = x_tr[m], x_te[m]
            if self.scale:  # fit on the rows the model trains on, apply everywhere
                fit = xt[train_idx.numpy()]
                lo, hi = fit.min(axis=0), fit.max(axis=0)
                xt, xe = (xt - lo) / (hi - lo + 1e-10), (xe - lo) / (hi - lo + 1e-10)
            inputs_tr[m] = torch.from_numpy(xt).float()
            inputs_te[m] = torch.from_numpy(xe).float()
        self.input_dims = {m: inputs_tr[m].shape[1] for m in self.modalities}
        self.train_set = TensorDictDataset(
            {m: x[train_idx] for m, x in inputs_tr.items()}, target_tr[train_idx]
        )
        self.test_set = TensorDictDataset(inputs_te, torch.from_numpy(y_te))
        if self.selection == "test":
            self.val_set = self.test_set
        else:
            self.val_set = TensorDictDataset(
                {m: x[val_idx] for m, x in inputs_tr.items()}, target_tr[val_idx]
            )

    @staticmethod
    def write(
        folder: Path,
        views: Mapping[int, tuple[np.ndarray, np.ndarray]],
        labels: tuple[np.ndarray, np.ndarray],
    ) -> None:
        """Write a dataset in MOGONET layout (``%.18e``, no header), e.g. fixtures for tests."""
        folder.mkdir(parents=True, exist_ok=True)
        for v, (tr, te) in views.items():
            np.savetxt(folder / f"{v}_tr.csv", tr, delimiter=",")
            np.savetxt(folder / f"{v}_te.csv", te, delimiter=",")
        np.savetxt(folder / "labels_tr.csv", np.asarray(labels[0], dtype=float))
        np.savetxt(folder / "labels_te.csv", np.asarray(labels[1], dtype=float))
