"""CMU-MOSI / CMU-MOSEI in the MAG-BERT pickle layout (Rahman et al. 2020, "Integrating Multimodal
Information in Large Pretrained Transformers"; WasifurRahman/BERT_multimodal_transformer).

One pickled dict per dataset, ``mosi.pkl`` / ``mosei.pkl`` (links in the repository's
``datasets/download_datasets.sh``)::

    {"train": [...], "dev": [...], "test": [...]}, each a list of samples
        ((words, visual, acoustic), label, segment)
         words     T strings (the segment's words)
         visual    float (T, 47)  MOSI FACET / (T, 35) MOSEI   one row per word
         acoustic  float (T, 74)  COVAREP                      one row per word
         label     float (1, 1)   sentiment score in [-3, 3]
         segment   the segment id, e.g. "03bSnISJMiM[0]" (not used)

MISA / MMIM-style files hold ``(words, visual, acoustic, actual_words)`` instead (``words`` are GloVe ids
there, ``actual_words`` the strings); those are read too, with ``actual_words`` as the words. MAG's
``examine.ipynb`` counts 1,281 / 229 / 685 samples for MOSI and 16,265 / 1,869 / 4,643 for MOSEI. Our split
names are ``train`` / ``val`` / ``test``; ``val`` is the pickle's ``"dev"``.

Alignment, as MAG's ``convert_to_features`` (`fusionbench.data.text.align_word_features`): each word is
tokenised by the pretrained model's tokenizer (``tokenizer``: a local folder), its visual and acoustic rows
are repeated once per word piece, pieces are cut to ``max_seq_len - 2``, and the special tokens and the
padding get zero rows (BERT ``[CLS] .. [SEP] pad``; XLNet ``pad .. <sep> <cls>``). Inputs: ``text``
LongTensor (N, 2, L) (ids, mask; the token contract), ``audio`` float (N, L, 74), ``vision`` float
(N, L, 47) (MOSEI 35).

Task: regression on the score, target ``(1,)``; MAG trains on MSE and keeps the lowest dev loss
(``regression_loss: mse``, ``monitor: val/loss``); its binary accuracy drops zero labels (``acc2_non0``).
NaN/inf features stop with a `DatasetError` unless ``nonfinite: zero`` (MAG passes them to the model).
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusionbench.data.base import FusionDataModule, TensorDictDataset, read_pickle, split_dict
from fusionbench.data.mosi_cmbert import EXTRA_METRICS, sign_counts
from fusionbench.data.text import (
    FIXTURE_WORDS,
    align_word_features_batch,
    check_tokenizer_dir,
    load_tokenizer,
    word_piece_counts,
)
from fusionbench.errors import DatasetError

log = logging.getLogger("fusionbench")

FILE = "mosi.pkl"
FEATURE_DIMS = {"audio": 74, "vision": 47}  # MOSI (global_configs.py); MOSEI: vision 35
SEQ_LEN = 50
PICKLE_SPLITS = {"train": "train", "val": "dev", "test": "test"}  # ours -> the pickle's keys
SIZES = {"train": 1281, "val": 229, "test": 685}  # MAG's mosi.pkl (examine.ipynb)
NONFINITE = ("error", "zero")
HOW_TO_GET = (
    "Download mosi.pkl / mosei.pkl with datasets/download_datasets.sh of "
    "github.com/WasifurRahman/BERT_multimodal_transformer (Google Drive / Dropbox links) and put it in this "
    "folder; fusionbench never downloads it."
)


class MAGDataModule(FusionDataModule):
    """Sentiment regression from words aligned to word pieces, with per-piece audio and vision rows.

    Args:
        tokenizer: local tokenizer folder (``tokenizer.save_pretrained(DIR)``; the configs take
            ``backbone.text.pretrained``); required (checked by `prepare_data`), the alignment depends on
            the word pieces.
        file: the pickle's name in ``data_dir`` (``mosi.pkl`` / ``mosei.pkl``).
        max_seq_len: token positions L (50, MAG's ``max_seq_length``).
        feature_dims: per-word widths ``{"audio": 74, "vision": 47}`` (MOSEI: vision 35).
        modalities: subset of ``[audio, text, vision]`` (default all).
        num_samples: expected samples ``{"train": n, "val": n, "test": n}``; ``None`` skips the check.
        nonfinite: ``error`` or ``zero`` for NaN/inf features.
        regression_loss: ``mse`` (MAG) or ``l1``.
        extra_metrics: logged besides MSE/MAE/Pearson (`fusionbench.metrics.sentiment`).
        **kwargs: `FusionDataModule` arguments (``name`` defaults to ``mosi_mag``, ``batch_size`` to 48 as
            MAG, ``monitor`` to ``val/loss``/``min``).
    """

    task_type = "regression"
    num_outputs = 1

    def __init__(
        self,
        tokenizer: str | None = None,
        file: str = FILE,
        max_seq_len: int = SEQ_LEN,
        feature_dims: Mapping[str, int] | None = None,
        modalities: Sequence[str] | None = None,
        num_samples: Mapping[str, int] | None = None,
        nonfinite: str = "error",
        regression_loss: str = "mse",
        extra_metrics: Sequence[str] = EXTRA_METRICS,
        **kwargs,
    ) -> None:
        kwargs.setdefault("name", "mosi_mag")
        kwargs.setdefault("batch_size", 48)
        kwargs.setdefault("monitor", {"metric": "val/loss", "mode": "min"})
        kwargs.setdefault("how_to_get", HOW_TO_GET)
        super().__init__(**kwargs)
        # checked when the data is prepared (`check_tokenizer_dir`), so configs compose without one
        self.tokenizer = None if tokenizer is None else str(tokenizer)
        self.file = str(file)
        self.max_seq_len = int(max_seq_len)
        if self.max_seq_len < 3:
            raise DatasetError(f"dataset.max_seq_len must be at least 3, got {max_seq_len}.")
        dims = dict(FEATURE_DIMS if feature_dims is None else feature_dims)
        if sorted(dims) != sorted(FEATURE_DIMS):
            raise DatasetError(
                f"dataset.feature_dims must give widths for {sorted(FEATURE_DIMS)}, got {sorted(dims)}."
            )
        self.feature_dims = {m: int(d) for m, d in dims.items()}
        if nonfinite not in NONFINITE:
            raise DatasetError(f"dataset.nonfinite must be one of {NONFINITE}, got {nonfinite!r}.")
        self.nonfinite = nonfinite
        self.modalities = self.select_modalities(["audio", "text", "vision"], modalities)
        widths = {
            "text": 2 * self.max_seq_len,
            **{m: self.max_seq_len * d for m, d in self.feature_dims.items()},
        }
        self.input_dims = {m: widths[m] for m in self.modalities}
        if num_samples is not None and sorted(num_samples) != sorted(SIZES):
            raise DatasetError(
                f"dataset.num_samples must give {sorted(SIZES)} (or be null), got keys {sorted(num_samples)}."
            )
        self.num_samples = None if num_samples is None else {s: int(n) for s, n in num_samples.items()}
        self.regression_loss = regression_loss
        self.extra_metrics = tuple(extra_metrics)
        self.encoder_args: dict[str, dict[str, Any]] = {}
        self.info: dict[str, Any] = {}

    @property
    def path(self) -> Path:
        return self.data_dir / self.file

    def required_files(self) -> list[str]:
        return [self.file]

    def check_present(self) -> None:
        super().check_present()
        check_tokenizer_dir(self.tokenizer)

    # -- loading -----------------------------------------------------------------------------
    def read_pickle(self) -> Mapping:
        data = read_pickle(self.path, self.how_to_get)
        return split_dict(data, self.path, list(PICKLE_SPLITS.values()), "MAG's pickle", self.how_to_get)

    def _samples(self, split: str, raw: Any) -> tuple[list[list[str]], np.ndarray, np.ndarray]:
        """Words, concatenated [audio | vision] rows per word (list of (T, da + dv)) and scores (N,)."""
        key = PICKLE_SPLITS[split]
        where = f"{self.path} ['{key}']"
        if not isinstance(raw, (list, tuple)):
            raise DatasetError(
                f"{where} is a {type(raw).__name__}; expected a list of samples. {self.how_to_get}"
            )
        if self.num_samples is not None and len(raw) != self.num_samples[split]:
            raise DatasetError(
                f"{where} has {len(raw)} samples, expected {self.num_samples[split]} "
                f"(dataset.num_samples.{split}). Set `dataset.num_samples` to the file's sizes (or null to "
                "skip the check) if this file is meant."
            )
        da, dv = self.feature_dims["audio"], self.feature_dims["vision"]
        words, feats, labels = [], [], []
        for i, item in enumerate(raw):
            at = f"{where}[{i}]"
            try:
                parts, label = item[0], item[1]
                if len(parts) == 4:  # MISA / MMIM: (glove ids, visual, acoustic, actual_words)
                    w, visual, acoustic = parts[3], parts[1], parts[2]
                else:
                    w, visual, acoustic = parts
            except (TypeError, ValueError, IndexError, KeyError):
                raise DatasetError(
                    f"{at} is not ((words, visual, acoustic), label, segment) (MAG's layout) or "
                    f"((words, visual, acoustic, actual_words), label, segment). {self.how_to_get}"
                ) from None
            w = [x.decode() if isinstance(x, bytes) else str(x) for x in w]
            try:
                v = np.asarray(visual, dtype=np.float32)
                a = np.asarray(acoustic, dtype=np.float32)
                y = np.asarray(label, dtype=np.float32)
            except (TypeError, ValueError) as e:
                raise DatasetError(f"{at}: visual, acoustic or label is not numeric ({e}).") from None
            for name, arr, d in (("acoustic", a, da), ("visual", v, dv)):
                if arr.shape != (len(w), d):
                    raise DatasetError(
                        f"{at} ({name}) has shape {arr.shape}, expected ({len(w)}, {d}): one row per word, "
                        f"dataset.feature_dims={self.feature_dims} (MOSI: audio 74, vision 47; MOSEI: audio "
                        "74, vision 35)."
                    )
            score = float(y.reshape(-1)[0]) if y.size else math.nan
            if y.size != 1 or not math.isfinite(score) or abs(score) > 3:
                raise DatasetError(
                    f"{at}: label {np.array2string(y.reshape(-1)[:7])} is not one sentiment score in "
                    f"[-3, 3]. {self.how_to_get}"
                )
            words.append(w)
            feats.append(np.concatenate([a, v], axis=1))
            labels.append(score)
        return words, feats, np.asarray(labels, dtype=np.float32)

    def _clean(self, split: str, feats: list[np.ndarray]) -> dict[str, int]:
        da = self.feature_dims["audio"]
        where = f"{self.path} ['{PICKLE_SPLITS[split]}']"
        counts = {}
        for m, cols in (("audio", slice(0, da)), ("vision", slice(da, None))):
            bad = [int((~np.isfinite(f[:, cols])).sum()) for f in feats]
            total = sum(bad)
            counts[f"{m}_nonfinite_to_0"] = total
            if total == 0:
                continue
            if self.nonfinite == "error":
                samples = [i for i, b in enumerate(bad) if b]
                raise DatasetError(
                    f"{where} {m} features have {total} NaN/inf value(s) in {len(samples)} sample(s), first "
                    f"samples {samples[:5]}. Set `dataset.nonfinite=zero` to replace them with 0 (MAG would "
                    "pass them to the model), or re-obtain the file."
                )
            for f in feats:
                f[:, cols][~np.isfinite(f[:, cols])] = 0.0
            log.warning("mag: replaced %d NaN/inf %s value(s) of %s with 0.", total, m, split)
        return counts

    def _load(self) -> None:
        data = self.read_pickle()
        tok = load_tokenizer(self.tokenizer)
        da = self.feature_dims["audio"]
        info: dict[str, Any] = {"tokenizer": self.tokenizer, "max_seq_len": self.max_seq_len}
        for k in ("sizes", "label_signs", "truncated", "oov_rate", "cleaned", "empty"):
            info[k] = {}
        sets = {}
        for split, key in PICKLE_SPLITS.items():
            words, feats, y = self._samples(split, data[key])
            if len(y) == 0:
                raise DatasetError(f"{self.path} ['{key}'] has no samples. {self.how_to_get}")
            info["cleaned"][split] = self._clean(split, feats)
            tokens, aligned = align_word_features_batch(words, feats, tok, self.max_seq_len)
            # samples whose pieces were cut (MAG: `tokens[: max_seq_length - 2]`)
            room = self.max_seq_len - tok.num_special_tokens_to_add(pair=False)
            info["truncated"][split] = sum(p > room for p in word_piece_counts(words, tok))
            real = tokens[:, 1].sum(1)
            unk = tok.unk_token_id
            info["oov_rate"][split] = (
                float(((tokens[:, 0] == unk) & (tokens[:, 1] == 1)).sum() / max(int(real.sum()), 1))
                if unk is not None
                else 0.0
            )
            info["sizes"][split] = len(y)
            info["label_signs"][split] = sign_counts(y)
            info["empty"][split] = sum(not w for w in words)
            parts = {"text": tokens, "audio": aligned[:, :, :da], "vision": aligned[:, :, da:]}
            inputs = {m: parts[m].contiguous() for m in self.modalities}
            sets[split] = TensorDictDataset(inputs, torch.from_numpy(y).reshape(-1, 1))
        del data
        self.train_set, self.val_set, self.test_set = sets["train"], sets["val"], sets["test"]
        info["vocab_size"] = len(tok)
        self.info = info

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["mag"] = self.info
        return out


def make_fixture(
    sizes: Mapping[str, int] | None = None,
    seed: int = 0,
    feature_dims: Mapping[str, int] | None = None,
    max_words: int = 20,
) -> dict:
    """MAG's dict with ``sizes`` samples per split (default 24 / 8 / 8): words from FIXTURE_WORDS (1 ..
    ``max_words``), float32 visual / acoustic rows per word, labels (1, 1) in [-3, 3] that follow the
    features (several exactly 0), segment ids ``vid<k>[<i>]``."""
    sizes = dict(sizes or {"train": 24, "val": 8, "test": 8})
    dims = dict(feature_dims or FEATURE_DIMS)
    rng = np.random.default_rng(seed)
    out = {}
    for split, key in PICKLE_SPLITS.items():
        samples = []
        n = int(sizes[split])
        for i in range(n):
            t = int(rng.integers(1, max_words + 1))
            words = [str(w) for w in rng.choice(FIXTURE_WORDS, size=t)]
            visual = rng.normal(size=(t, dims["vision"])).astype(np.float32)
            acoustic = rng.normal(size=(t, dims["audio"])).astype(np.float32)
            score = (
                0.0
                if i % 3 == 0
                else float(np.clip(np.round(np.tanh(acoustic[:, 0].mean() * 3) * 3, 1), -3, 3))
            )
            samples.append(
                ((words, visual, acoustic), np.array([[score]], dtype=np.float32), f"vid{i // 4}[{i % 4}]")
            )
        out[key] = samples
    return out


def write_fixture(
    folder: Path,
    file: str = FILE,
    sizes: Mapping[str, int] | None = None,
    seed: int = 0,
    feature_dims: Mapping[str, int] | None = None,
    data: dict | None = None,
) -> Path:
    """Pickle `make_fixture` (or ``data``) as ``folder/file`` in MAG's layout; returns ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / file, "wb") as f:
        pickle.dump(make_fixture(sizes, seed, feature_dims) if data is None else data, f, protocol=4)
    return folder
