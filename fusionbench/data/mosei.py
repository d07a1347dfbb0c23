"""CMU-MOSEI sentiment in MultiBench's affect pickle layout (DynMM, Pro-Fusion; MultiBench
``datasets/affect``).

One pickled dict, ``mosei_senti_data.pkl`` (Google Drive folder linked in MultiBench's README; the
``mosei_raw.pkl``-style files have the same nesting)::

    {"train": {...}, "valid": {...}, "test": {...}}, each split
        {"text":   float (N, 50, 300)   GloVe 840B word vectors
         "audio":  float (N, 50, 74)    COVAREP
         "vision": float (N, 50, 35)    FACET 4.2
         "labels": float (N, 1, 1)      sentiment score in [-3, 3]
         "id":     segment ids (N, ...)}  (not used here)

Time steps are word-aligned and left-padded with zeros (the last 50 words). Official sizes
16,326 / 1,871 / 4,659 segments (``num_samples`` checks the stored rows when given). Our split names
are ``train`` / ``val`` / ``test``; ``val`` is the pickle's ``"valid"``.

Preprocessing, as MultiBench's ``get_dataloader`` unless marked:

1. ``audio == -inf`` is replaced by 0 (MultiBench's ``Affectdataset`` does exactly this; COVAREP has
   -inf for silent frames). The count is recorded.
2. (not MultiBench) any other NaN/inf, in any modality or after step 1, stops with a `DatasetError`
   naming split, key, count and first samples; ``nonfinite="zero"`` replaces them with 0 instead
   (MultiBench passes them to the model). Non-finite labels always stop.
3. ``drop_empty_text``: samples whose text is all zero are dropped (MultiBench's ``drop_entry``, in
   every split; its test is ``text.sum() == 0``, ours "no non-zero value", the same on real data).
4. ``padding``: ``left`` (default) serves the stored 50 steps unchanged, so the last step is the last
   word (what ``pool: last`` encoders need); ``right`` is MultiBench's ``max_pad=True``: drop the steps
   before the first non-zero text step, then end-pad with zeros to ``seq_len``. (MultiBench's default,
   packed batches end-padded per batch, has no fixed-shape equivalent.)

Task: regression on the score, one output, target shape ``(1,)``; metrics ``mse``, ``mae``, ``pearson``
(the project's regression collection). Checkpoints are selected on ``val/mae``, the L1 that MultiBench
and DynMM train and select with. DynMM's "binary accuracy" is ``(pred >= 0) == (truth >= 0)`` on all
samples (``acc2_has0``); MultiBench's default drops ``truth == 0`` and compares ``> 0`` (``acc2_non0``).
Neither is computed by the regression collection yet.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusionbench.data.base import FusionDataModule, TensorDictDataset, read_pickle, split_dict
from fusionbench.errors import DatasetError

log = logging.getLogger("fusionbench")

FILE = "mosei_senti_data.pkl"
FEATURE_DIMS = {"audio": 74, "text": 300, "vision": 35}  # mosei_senti_data.pkl / mosi_raw.pkl
SEQ_LEN = 50
SIZES = {"train": 16326, "val": 1871, "test": 4659}  # official folds in the aligned pickles
PICKLE_SPLITS = {"train": "train", "val": "valid", "test": "test"}  # ours -> the pickle's keys
PADDING = ("left", "right")
NONFINITE = ("error", "zero")
HOW_TO_GET = (
    "Download mosei_senti_data.pkl from the Google Drive folder linked in MultiBench's README (affect "
    "datasets, pliang279/MultiBench) and put it in this folder; fusionbench never downloads it."
)


class MOSEIDataModule(FusionDataModule):
    """Sentiment regression (score in [-3, 3]) from word-aligned text, audio and vision sequences.

    Args:
        file: the pickle's name in ``data_dir`` (``mosei_senti_data.pkl``).
        modalities: subset of ``[audio, text, vision]`` (default all).
        feature_dims: per-step widths ``{"audio": 74, "text": 300, "vision": 35}``; other pickles of
            the same nesting (e.g. MOSI's ``mosi_data.pkl``: vision 20, audio 5) set theirs.
        seq_len: time steps per sample (50).
        num_samples: expected stored rows ``{"train": n, "val": n, "test": n}`` (before dropping);
            ``None`` skips the check. The configs give the official 16,326 / 1,871 / 4,659.
        drop_empty_text: drop samples whose text is all zero (MultiBench).
        padding: ``left`` (as stored) or ``right`` (MultiBench ``max_pad``); module docstring, step 4.
        nonfinite: ``error`` or ``zero`` for NaN/inf other than audio ``-inf`` (module docstring, step 2).
        regression_loss: ``l1`` (MultiBench and DynMM train MOSEI on L1) or ``mse``.
        extra_metrics: logged besides MSE/MAE/Pearson; ``acc2_has0`` is DynMM's binary accuracy
            (sign incl. zeros), ``acc2_non0`` MultiBench's (zeros excluded), `fusionbench.metrics`.
        **kwargs: `FusionDataModule` arguments (``name`` defaults to ``mosei``, ``batch_size`` to 32 as
            MultiBench / DynMM, ``monitor`` to ``val/mae``/``min``).
    """

    task_type = "regression"
    num_outputs = 1

    def __init__(
        self,
        file: str = FILE,
        modalities: Sequence[str] | None = None,
        feature_dims: Mapping[str, int] | None = None,
        seq_len: int = SEQ_LEN,
        num_samples: Mapping[str, int] | None = None,
        drop_empty_text: bool = True,
        padding: str = "left",
        nonfinite: str = "error",
        regression_loss: str = "l1",
        extra_metrics: Sequence[str] = ("acc2_has0", "acc2_non0"),
        **kwargs,
    ) -> None:
        kwargs.setdefault("name", "mosei")
        kwargs.setdefault("batch_size", 32)
        kwargs.setdefault("monitor", {"metric": "val/mae", "mode": "min"})
        kwargs.setdefault("how_to_get", HOW_TO_GET)
        super().__init__(**kwargs)
        if padding not in PADDING:
            raise DatasetError(f"dataset.padding must be one of {PADDING}, got {padding!r}.")
        if nonfinite not in NONFINITE:
            raise DatasetError(f"dataset.nonfinite must be one of {NONFINITE}, got {nonfinite!r}.")
        dims = dict(FEATURE_DIMS if feature_dims is None else feature_dims)
        if sorted(dims) != sorted(FEATURE_DIMS):
            raise DatasetError(
                f"dataset.feature_dims must give widths for {sorted(FEATURE_DIMS)}, got {sorted(dims)}."
            )
        self.feature_dims = {m: int(d) for m, d in dims.items()}
        self.file = str(file)
        self.modalities = self.select_modalities(sorted(FEATURE_DIMS), modalities)
        self.seq_len = int(seq_len)
        if self.seq_len < 1:
            raise DatasetError(f"dataset.seq_len must be a positive integer, got {seq_len}.")
        self.input_dims = {m: self.seq_len * self.feature_dims[m] for m in self.modalities}
        if num_samples is not None and sorted(num_samples) != sorted(SIZES):
            raise DatasetError(
                f"dataset.num_samples must give {sorted(SIZES)} (or be null), got keys {sorted(num_samples)}."
            )
        self.num_samples = None if num_samples is None else {s: int(n) for s, n in num_samples.items()}
        self.drop_empty_text = bool(drop_empty_text)
        self.padding = padding
        self.nonfinite = nonfinite
        self.regression_loss = regression_loss
        self.extra_metrics = tuple(extra_metrics)
        self.info: dict[str, Any] = {}

    @property
    def path(self) -> Path:
        return self.data_dir / self.file

    def required_files(self) -> list[str]:
        return [self.file]

    # -- loading -----------------------------------------------------------------------------
    def read_pickle(self) -> Mapping:
        data = read_pickle(self.path, self.how_to_get)
        return split_dict(
            data, self.path, list(PICKLE_SPLITS.values()), "MultiBench's affect pickle", self.how_to_get
        )

    def _split_arrays(self, split: str, raw: Any) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The modalities this run needs (float32, (N, seq_len, width)) and the scores (N,) of one split,
        shape-checked."""
        key = PICKLE_SPLITS[split]
        where = f"{self.path} ['{key}']"
        if not isinstance(raw, Mapping):
            raise DatasetError(
                f"{where} is a {type(raw).__name__}; expected a dict of arrays. {self.how_to_get}"
            )
        needed = set(self.modalities) | (
            {"text"} if self.drop_empty_text or self.padding == "right" else set()
        )
        arrays = {}
        for m in sorted(needed) + ["labels"]:
            if m not in raw:
                raise DatasetError(
                    f"{where} has no key '{m}'; it holds {sorted(map(str, raw))}, expected text, audio, "
                    f"vision, labels. {self.how_to_get}"
                )
            try:
                arrays[m] = np.asarray(raw[m], dtype=np.float32)
            except (TypeError, ValueError) as e:
                raise DatasetError(
                    f"{where}['{m}'] is not a numeric array ({e}). {self.how_to_get}"
                ) from None
        n = len(arrays["labels"]) if arrays["labels"].ndim else 0
        for m in sorted(needed):
            shape, want = arrays[m].shape, (n, self.seq_len, self.feature_dims[m])
            if shape != want:
                raise DatasetError(
                    f"{where}['{m}'] has shape {shape}, expected {want} (samples, time steps, features; N "
                    "from 'labels'). Check `dataset.feature_dims` / `dataset.seq_len` or the file. "
                    f"{self.how_to_get}"
                )
        y = arrays.pop("labels")
        if y.ndim == 0 or y.ndim > 3 or y.size != n:
            raise DatasetError(
                f"{where}['labels'] has shape {y.shape}, expected ({n}, 1, 1) (one sentiment score per "
                "sample). "
                f"{self.how_to_get}"
            )
        if self.num_samples is not None and n != self.num_samples[split]:
            raise DatasetError(
                f"{where} has {n} samples, expected {self.num_samples[split]} "
                f"(dataset.num_samples.{split}). Set `dataset.num_samples` to the file's sizes (or null to "
                "skip the check) if this file is meant."
            )
        return arrays, y.reshape(n)

    def _clean(self, split: str, x: dict[str, np.ndarray], y: np.ndarray) -> dict[str, Any]:
        """Steps 1 and 2 of the module docstring, in place; returns counts for the record."""
        where = f"{self.path} ['{PICKLE_SPLITS[split]}']"
        counts: dict[str, Any] = {}
        if "audio" in x:
            neg_inf = x["audio"] == -np.inf
            counts["audio_neg_inf_to_0"] = int(neg_inf.sum())
            x["audio"][neg_inf] = 0.0
        bad_y = ~np.isfinite(y)
        if bad_y.any():
            raise DatasetError(
                f"{where}['labels'] has {int(bad_y.sum())} NaN/inf score(s), first samples "
                f"{np.flatnonzero(bad_y)[:5].tolist()}. Re-obtain the file. {self.how_to_get}"
            )
        for m, a in x.items():
            bad = ~np.isfinite(a)
            if not bad.any():
                continue
            if self.nonfinite == "error":
                samples = np.flatnonzero(bad.any(axis=(1, 2)))
                extra = (
                    " other than audio -inf (which is replaced with 0 as in MultiBench)"
                    if m == "audio"
                    else ""
                )
                raise DatasetError(
                    f"{where}['{m}'] has {int(bad.sum())} NaN/inf value(s){extra} in {len(samples)} "
                    f"sample(s), first samples {samples[:5].tolist()}. Set `dataset.nonfinite=zero` to "
                    "replace them with 0 (MultiBench would pass them to the model), or re-obtain the file."
                )
            counts[f"{m}_nonfinite_to_0"] = int(bad.sum())
            a[bad] = 0.0
            log.warning("mosei: replaced %d NaN/inf value(s) of %s['%s'] with 0.", int(bad.sum()), split, m)
        return counts

    def _right_pad(self, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """MultiBench's ``max_pad``: each sample starts at its first non-zero text step, end-padded with 0."""
        t = self.seq_len
        nonzero = np.any(x["text"] != 0, axis=2)  # (N, T)
        start = np.where(nonzero.any(axis=1), nonzero.argmax(axis=1), t)
        idx = np.arange(t)[None, :] + start[:, None]
        keep = (idx < t)[:, :, None]
        idx = np.minimum(idx, t - 1)[:, :, None]
        return {m: np.take_along_axis(a, idx, axis=1) * keep for m, a in x.items()}

    def _load(self) -> None:
        data = self.read_pickle()
        sets, info = {}, {"stored": {}, "dropped_empty_text": {}, "cleaned": {}, "padding": self.padding}
        for split, key in PICKLE_SPLITS.items():
            x, y = self._split_arrays(split, data[key])
            info["stored"][split] = len(y)
            info["cleaned"][split] = self._clean(split, x, y)
            if self.drop_empty_text:
                keep = np.any(x["text"] != 0, axis=(1, 2))
                info["dropped_empty_text"][split] = int((~keep).sum())
                if not keep.all():
                    x, y = {m: a[keep] for m, a in x.items()}, y[keep]
            if len(y) == 0:
                raise DatasetError(f"{self.path} ['{key}'] has no samples with text left. {self.how_to_get}")
            if self.padding == "right":
                x = self._right_pad(x)
            inputs = {
                m: torch.from_numpy(np.ascontiguousarray(x[m], dtype=np.float32)) for m in self.modalities
            }
            sets[split] = TensorDictDataset(inputs, torch.from_numpy(y.astype(np.float32)).reshape(-1, 1))
        del data
        self.train_set, self.val_set, self.test_set = sets["train"], sets["val"], sets["test"]
        self.info = info

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["mosei"] = self.info
        return out


def make_fixture(
    sizes: Mapping[str, int] | None = None,
    seed: int = 0,
    feature_dims: Mapping[str, int] | None = None,
    seq_len: int = SEQ_LEN,
) -> dict:
    """MultiBench's nested dict with ``sizes`` samples per split (default 24 / 8 / 8), float32 arrays.

    Sequences are left-padded with zeros (2 .. seq_len words); audio holds some ``-inf`` (as COVAREP
    does); scores are multiples of 1/3 in [-3, 3] (several exactly 0) and depend on the inputs.
    """
    sizes = dict(sizes or {"train": 24, "val": 8, "test": 8})
    dims = dict(feature_dims or FEATURE_DIMS)
    rng = np.random.default_rng(seed)
    out = {}
    for split, key in PICKLE_SPLITS.items():
        n = int(sizes[split])
        length = rng.integers(2, seq_len + 1, n)
        mask = (np.arange(seq_len)[None, :] >= (seq_len - length)[:, None]).astype(np.float32)[:, :, None]
        part = {m: rng.normal(size=(n, seq_len, d)).astype(np.float32) * mask for m, d in dims.items()}
        score = np.tanh(part["text"][:, -1, 0] + part["audio"][:, -1, 0]) * 3
        labels = np.clip(np.round(score * 3) / 3, -3, 3)
        labels[:: max(1, n // 3)] = 0.0  # exact zeros: the two binary-accuracy conventions differ on them
        audio = part["audio"]
        audio[:, -1, -1] = np.where(rng.random(n) < 0.5, -np.inf, audio[:, -1, -1])
        part["labels"] = labels.astype(np.float32).reshape(n, 1, 1)
        part["id"] = np.array([[f"video{split}{i // 4}", str(i % 4)] for i in range(n)])
        out[key] = {k: part[k] for k in ("vision", "audio", "text", "labels", "id")}
    return out


def write_fixture(
    folder: Path,
    sizes: Mapping[str, int] | None = None,
    seed: int = 0,
    file: str = FILE,
    data: dict | None = None,
) -> Path:
    """Pickle `make_fixture` (or ``data``) as ``folder/file`` in MultiBench's layout; returns ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / file, "wb") as f:
        pickle.dump(make_fixture(sizes, seed) if data is None else data, f, protocol=4)
    return folder
