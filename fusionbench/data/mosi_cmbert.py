"""CMU-MOSI sentiment in CM-BERT's layout (thuiar/Cross-Modal-BERT ``data/``; DEQ fusion, Table 3).

Files under ``data_dir`` (the repository's ``data/`` folder, copied as is)::

    text/train.tsv, text/dev.tsv, text/test.tsv   header ``text<TAB>label``; one segment per line: the
                                                 upper-case transcript and its sentiment score in [-3, 3]
    audio/MOSI_cmu_audio_CLS.pickle               pickled tuple (train_audio, valid_audio, test_audio),
                                                 float (N, 50, 5): word-aligned acoustic features matched
                                                 to BERT's 50 token positions (needed only with audio)

Official sizes 1,284 / 229 / 686 segments (``num_samples`` checks them when given). Our split names are
``train`` / ``val`` / ``test``; ``val`` is ``dev.tsv`` and the tuple's second array.

Text, as CM-BERT's ``convert_examples_to_features`` (``utils.py``): the whole transcript tokenised by the
pretrained model's tokenizer (``tokenizer`` = a local folder, bert-base-uncased in the paper), word pieces
cut to ``max_seq_len - 2``, ``[CLS] .. [SEP]``, zero padding to ``max_seq_len`` (50). ``tokenizer: words``
instead builds a word-level `WordVocab` from ``train.tsv`` (models trained from scratch; the audio
stays aligned to BERT's word pieces, so it does not line up with words). Inputs follow the token contract
(`fusionbench.data.text`): ``text`` LongTensor (N, 2, L) of ids and mask, ``audio`` float (N, L, 5).

Task: regression on the score, target ``(1,)``. CM-BERT trains on MSE (``regression_loss: mse``) and keeps
the epoch with the lowest dev loss (``monitor: val/loss``); its Acc-2 counts zero labels as negative
(``acc2_all_gt0``, `fusionbench.metrics.sentiment`).

Checks (each a `DatasetError` naming file and line): the header is ``text<TAB>label``, every line has two
fields, every label is a number in [-3, 3]; the audio tuple has three arrays of shape (N, L, audio_dim) with
N the rows of the matching tsv; NaN/inf audio stops unless ``nonfinite: zero``.
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

from fusionbench.data.base import FusionDataModule, TensorDictDataset, read_pickle
from fusionbench.data.text import (
    FIXTURE_WORDS,
    WordVocab,
    check_tokenizer_dir,
    encode_with_tokenizer,
    load_tokenizer,
    tokenizer_lengths,
    words_of,
)
from fusionbench.errors import DatasetError
from fusionbench.metrics.sentiment import SENTIMENT

log = logging.getLogger("fusionbench")

TEXT_FILES = {"train": "text/train.tsv", "val": "text/dev.tsv", "test": "text/test.tsv"}
AUDIO_FILE = "audio/MOSI_cmu_audio_CLS.pickle"
SPLITS = ("train", "val", "test")
SIZES = {"train": 1284, "val": 229, "test": 686}  # the tsvs' rows = the standard CMU-MOSI folds
HEADER = ("text", "label")
SEQ_LEN = 50
AUDIO_DIM = 5
WORDS = "words"
NONFINITE = ("error", "zero")
EXTRA_METRICS = SENTIMENT  # every sentiment variant, each named; CM-BERT / DEQ report acc2_all_gt0
HOW_TO_GET = (
    "Copy data/text/{train,dev,test}.tsv and data/audio/MOSI_cmu_audio_CLS.pickle of "
    "github.com/thuiar/Cross-Modal-BERT into text/ and audio/ of this folder (the audio only with the audio "
    "modality); fusionbench never downloads them."
)


def read_tsv(path: Path) -> tuple[list[str], np.ndarray]:
    """CM-BERT's ``text<TAB>label`` file -> (texts, float32 scores); malformed lines raise a `DatasetError`
    naming file and line (1 = the header)."""
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path} cannot be read as UTF-8 text ({type(e).__name__}: {e}).") from None
    lines = raw.split("\n")
    if lines and lines[-1] == "":  # the final newline ends the last line
        lines.pop()
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    if not lines or tuple(lines[0].split("\t")) != HEADER:
        got = repr(lines[0][:60]) if lines else "an empty file"
        raise DatasetError(
            f"{path}, line 1: header is {got}, expected 'text<TAB>label' (CM-BERT's data/text/*.tsv)."
        )
    texts, labels = [], []
    for no, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != 2:
            raise DatasetError(
                f"{path}, line {no}: {len(fields)} tab-separated field(s), expected 2 (text, label): "
                f"{line[:80]!r}."
            )
        text, label = fields
        try:
            score = float(label)
        except ValueError:
            raise DatasetError(
                f"{path}, line {no}: label {label[:40]!r} is not a number (sentiment score in [-3, 3])."
            ) from None
        if not (math.isfinite(score) and -3.0 <= score <= 3.0):
            raise DatasetError(f"{path}, line {no}: label {label!r} is outside the sentiment range [-3, 3].")
        texts.append(text)
        labels.append(score)
    return texts, np.asarray(labels, dtype=np.float32)


def sign_counts(y: np.ndarray) -> dict[str, int]:
    return {"pos": int((y > 0).sum()), "neg": int((y < 0).sum()), "zero": int((y == 0).sum())}


class CMBERTMOSIDataModule(FusionDataModule):
    """CMU-MOSI sentiment regression from transcripts (tokens) and BERT-aligned audio, CM-BERT's files.

    Args:
        tokenizer: a local tokenizer folder (``tokenizer.save_pretrained(DIR)``, e.g. bert-base-uncased; the
            configs take ``backbone.text.pretrained``), or ``words`` for a `WordVocab` of ``train.tsv``.
        max_seq_len: token positions L (50, CM-BERT's ``max_seq_length``; the audio file is aligned to it).
        modalities: subset of ``[audio, text]`` (default both); text only needs no audio file.
        num_samples: expected rows ``{"train": n, "val": n, "test": n}``; ``None`` skips the check. The
            configs give the official 1,284 / 229 / 686.
        audio_dim: audio features per token (5).
        min_freq: with ``tokenizer: words``, words seen fewer times in ``train.tsv`` map to unknown.
        nonfinite: ``error`` or ``zero`` for NaN/inf audio values.
        regression_loss: ``mse`` (CM-BERT) or ``l1``.
        extra_metrics: logged besides MSE/MAE/Pearson (`fusionbench.metrics.sentiment`).
        **kwargs: `FusionDataModule` arguments (``name`` defaults to ``mosi_cmbert``, ``batch_size`` to 24 as
            CM-BERT, ``monitor`` to ``val/loss``/``min``: CM-BERT keeps the lowest dev loss).

    After `setup()`, ``encoder_args`` holds ``{"text": {"vocab_size": V, "pad_id": 0}}`` with
    ``tokenizer: words`` (empty with a pretrained tokenizer).
    """

    task_type = "regression"
    num_outputs = 1

    def __init__(
        self,
        tokenizer: str | None = WORDS,
        max_seq_len: int = SEQ_LEN,
        modalities: Sequence[str] | None = None,
        num_samples: Mapping[str, int] | None = None,
        audio_dim: int = AUDIO_DIM,
        min_freq: int = 1,
        nonfinite: str = "error",
        regression_loss: str = "mse",
        extra_metrics: Sequence[str] = EXTRA_METRICS,
        **kwargs,
    ) -> None:
        kwargs.setdefault("name", "mosi_cmbert")
        kwargs.setdefault("batch_size", 24)
        kwargs.setdefault("monitor", {"metric": "val/loss", "mode": "min"})
        kwargs.setdefault("how_to_get", HOW_TO_GET)
        super().__init__(**kwargs)
        # a folder is checked when the data is prepared (`check_tokenizer_dir`): configs compose without one
        self.tokenizer = None if tokenizer is None else str(tokenizer)
        self.max_seq_len = int(max_seq_len)
        if self.max_seq_len < 3:
            raise DatasetError(f"dataset.max_seq_len must be at least 3, got {max_seq_len}.")
        self.audio_dim = int(audio_dim)
        self.feature_dims = {"audio": self.audio_dim}  # per-token widths, as the other sentiment datasets
        self.min_freq = int(min_freq)
        if nonfinite not in NONFINITE:
            raise DatasetError(f"dataset.nonfinite must be one of {NONFINITE}, got {nonfinite!r}.")
        self.nonfinite = nonfinite
        self.modalities = self.select_modalities(["audio", "text"], modalities)
        # flattened per-sample widths: the (2, L) ids+mask and the (L, audio_dim) features
        widths = {"audio": self.max_seq_len * self.audio_dim, "text": 2 * self.max_seq_len}
        self.input_dims = {m: widths[m] for m in self.modalities}
        if num_samples is not None and sorted(num_samples) != sorted(SIZES):
            raise DatasetError(
                f"dataset.num_samples must give {sorted(SIZES)} (or be null), got keys {sorted(num_samples)}."
            )
        self.num_samples = None if num_samples is None else {s: int(n) for s, n in num_samples.items()}
        self.regression_loss = regression_loss
        self.extra_metrics = tuple(extra_metrics)
        self.encoder_args: dict[str, dict[str, Any]] = {}
        self.vocab: WordVocab | None = None
        self.info: dict[str, Any] = {}

    def required_files(self) -> list[str]:
        return [TEXT_FILES[s] for s in SPLITS] + ([AUDIO_FILE] if "audio" in self.modalities else [])

    def check_present(self) -> None:
        super().check_present()
        if "text" not in self.modalities or self.tokenizer == WORDS:
            return
        if self.tokenizer is None or not self.tokenizer.strip():
            raise DatasetError(
                "dataset.tokenizer is empty: give a local tokenizer folder (written by "
                "`tokenizer.save_pretrained(DIR)`; the configs take `backbone.text.pretrained`) or `words` "
                "for a word vocabulary built from train.tsv."
            )
        check_tokenizer_dir(self.tokenizer)

    # -- loading -----------------------------------------------------------------------------
    def read_audio(self, rows: Mapping[str, int]) -> dict[str, np.ndarray]:
        """The pickle's three arrays as float32 (N, L, audio_dim), checked against the tsvs' row counts."""
        path = self.data_dir / AUDIO_FILE
        data = read_pickle(path, self.how_to_get)
        if not isinstance(data, (tuple, list)) or len(data) != 3:
            what = f"a {len(data)}-tuple" if isinstance(data, (tuple, list)) else f"a {type(data).__name__}"
            raise DatasetError(
                f"{path} holds {what}; expected CM-BERT's tuple (train_audio, valid_audio, test_audio). "
                f"{self.how_to_get}"
            )
        out = {}
        for k, (split, raw) in enumerate(zip(SPLITS, data)):
            where = f"{path} [{k}] ({split}, {Path(TEXT_FILES[split]).name})"
            try:
                a = np.array(raw, dtype=np.float32)
            except (TypeError, ValueError) as e:
                raise DatasetError(f"{where} is not a numeric array ({e}). {self.how_to_get}") from None
            want = (rows[split], self.max_seq_len, self.audio_dim)
            if a.shape != want:
                raise DatasetError(
                    f"{where} has shape {a.shape}, expected {want}: one row per line of "
                    f"{TEXT_FILES[split]} ({rows[split]}), audio aligned to dataset.max_seq_len="
                    f"{self.max_seq_len} token positions, dataset.audio_dim={self.audio_dim} features. The "
                    "audio and text files must come from the same CM-BERT copy."
                )
            bad = ~np.isfinite(a)
            if bad.any():
                if self.nonfinite == "error":
                    samples = np.flatnonzero(bad.any(axis=(1, 2)))
                    raise DatasetError(
                        f"{where} has {int(bad.sum())} NaN/inf value(s) in {len(samples)} sample(s), first "
                        f"samples {samples[:5].tolist()}. Set `dataset.nonfinite=zero` to replace them with "
                        "0, or re-obtain the file."
                    )
                log.warning(
                    "mosi_cmbert: replaced %d NaN/inf audio value(s) of %s with 0.", int(bad.sum()), split
                )
                a[bad] = 0.0
            self.info.setdefault("audio_nonfinite_to_0", {})[split] = int(bad.sum())
            out[split] = a
        return out

    def _tokens(self, texts: dict[str, list[str]]) -> dict[str, torch.Tensor]:
        """Token tensors per split and the text part of the record."""
        info = self.info
        if self.tokenizer == WORDS:
            vocab = WordVocab(texts["train"], min_freq=self.min_freq)  # train only: no test words leak in
            self.vocab = vocab
            self.encoder_args = {"text": {"vocab_size": vocab.size, "pad_id": 0}}
            info["vocab_size"] = vocab.size
            info["oov_rate"] = {s: vocab.oov_rate(t) for s, t in texts.items()}
            info["truncated"] = {
                s: sum(len(words_of(x)) > self.max_seq_len for x in t) for s, t in texts.items()
            }
            return {s: vocab.encode(t, self.max_seq_len) for s, t in texts.items()}
        tok = load_tokenizer(self.tokenizer)
        self.encoder_args = {}
        out = {s: encode_with_tokenizer(t, tok, self.max_seq_len) for s, t in texts.items()}
        info["vocab_size"] = len(tok)
        info["truncated"] = {
            s: int((tokenizer_lengths(t, tok) > self.max_seq_len).sum()) for s, t in texts.items()
        }
        unk = tok.unk_token_id
        info["oov_rate"] = {
            s: float(((x[:, 0] == unk) & (x[:, 1] == 1)).sum() / max(int(x[:, 1].sum()), 1))
            if unk is not None
            else 0.0
            for s, x in out.items()
        }
        return out

    def _load(self) -> None:
        self.info = {"tokenizer": self.tokenizer, "max_seq_len": self.max_seq_len}
        texts, labels = {}, {}
        for split in SPLITS:
            texts[split], labels[split] = read_tsv(self.data_dir / TEXT_FILES[split])
            n = len(labels[split])
            if n == 0:
                raise DatasetError(f"{self.data_dir / TEXT_FILES[split]} has no rows. {self.how_to_get}")
            if self.num_samples is not None and n != self.num_samples[split]:
                raise DatasetError(
                    f"{self.data_dir / TEXT_FILES[split]} has {n} rows, expected {self.num_samples[split]} "
                    f"(dataset.num_samples.{split}). Set `dataset.num_samples` to the files' sizes (or null "
                    "to skip the check) if these files are meant."
                )
        self.info["sizes"] = {s: len(y) for s, y in labels.items()}
        self.info["label_signs"] = {s: sign_counts(y) for s, y in labels.items()}
        self.info["empty_texts"] = {s: sum(not words_of(x) for x in t) for s, t in texts.items()}
        audio = self.read_audio(self.info["sizes"]) if "audio" in self.modalities else None
        if audio is not None and self.tokenizer == WORDS:
            log.warning(
                "mosi_cmbert: the audio file is aligned to BERT word pieces, not to the words of "
                "`tokenizer: words`; audio position t and word t are different units."
            )
        tokens = self._tokens(texts) if "text" in self.modalities else None
        sets = {}
        for split in SPLITS:
            inputs = {}
            if tokens is not None:
                inputs["text"] = tokens[split]
            if audio is not None:
                inputs["audio"] = torch.from_numpy(audio[split])
            sets[split] = TensorDictDataset(inputs, torch.from_numpy(labels[split]).reshape(-1, 1))
        self.train_set, self.val_set, self.test_set = sets["train"], sets["val"], sets["test"]

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["mosi_cmbert"] = self.info
        return out


def fixture_text(rng: np.random.Generator, low: int = 2, high: int = 16) -> str:
    """An upper-case transcript of FIXTURE_WORDS (as CM-BERT's), sometimes with a trailing space."""
    words = rng.choice(FIXTURE_WORDS, size=int(rng.integers(low, high + 1)))
    return " ".join(words).upper() + (" " if rng.random() < 0.3 else "")


def write_tsv(path: Path, texts: Sequence[str], labels: Sequence[float]) -> Path:
    """CM-BERT's ``text<TAB>label`` file (labels with one decimal, no final newline as the originals)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = ["text\tlabel"] + [f"{t}\t{float(y):.1f}" for t, y in zip(texts, labels)]
    path.write_text("\n".join(rows), encoding="utf-8")
    return path


def write_fixture(
    folder: Path,
    sizes: Mapping[str, int] | None = None,
    seed: int = 0,
    audio: bool = True,
    seq_len: int = SEQ_LEN,
    audio_dim: int = AUDIO_DIM,
) -> Path:
    """CM-BERT's layout in ``folder`` with ``sizes`` rows per split (default 24 / 8 / 8): the three tsvs
    (texts of FIXTURE_WORDS, scores with one decimal in [-3, 3] that follow the words' sentiment, several
    exactly 0) and, with ``audio``, the pickled tuple of float (N, seq_len, audio_dim) arrays (zero after
    each text's length, like the padding positions). Returns ``folder``."""
    folder = Path(folder)
    sizes = dict(sizes or {"train": 24, "val": 8, "test": 8})
    rng = np.random.default_rng(seed)
    positive = {"good", "great", "awesome", "amazing", "funny", "fun", "beautiful", "love", "loved", "best"}
    negative = {"bad", "boring", "terrible", "awful", "sad", "worst", "hate", "hated", "stupid", "dull"}
    arrays = []
    for split in SPLITS:
        n = int(sizes[split])
        texts = [fixture_text(rng) for _ in range(n)]
        score = np.array([sum((w in positive) - (w in negative) for w in words_of(t)) for t in texts], float)
        labels = np.clip(np.round(score + rng.normal(0, 0.3, n), 1), -3, 3)
        labels[:: max(1, n // 3)] = 0.0  # exact zeros: the binary-accuracy conventions differ on them
        write_tsv(folder / TEXT_FILES[split], texts, labels)
        length = np.array([min(len(words_of(t)) + 2, seq_len) for t in texts])
        keep = (np.arange(seq_len)[None, :] < length[:, None])[:, :, None]
        arrays.append(rng.normal(size=(n, seq_len, audio_dim)) * keep)
    if audio:
        (folder / AUDIO_FILE).parent.mkdir(parents=True, exist_ok=True)
        with open(folder / AUDIO_FILE, "wb") as f:
            pickle.dump(tuple(arrays), f, protocol=4)
    return folder
