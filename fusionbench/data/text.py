"""Tokenisation shared by the text datasets (CM-BERT's MOSI, the MAG pickles).

Token contract: a tokenised text is a LongTensor ``(N, 2, L)``; ``x[:, 0]`` holds token ids, ``x[:, 1]`` the
attention mask (1 = real token, 0 = padding); ``L`` is the dataset's ``max_seq_len``.

* `load_tokenizer`: a HuggingFace tokenizer from a local folder (``tokenizer.save_pretrained(DIR)``);
  fusionbench never downloads.
* `encode_with_tokenizer`: whole texts as CM-BERT's ``convert_examples_to_features``
  (thuiar/Cross-Modal-BERT ``utils.py``): word pieces cut to ``L - 2``, ``[CLS] .. [SEP]``, zero padding;
  the tokenizer's own template and padding side are used, so XLNet gets ``.. <sep> <cls>`` padded on the left.
* `align_word_features`: MAG's ``convert_to_features`` (WasifurRahman/BERT_multimodal_transformer
  ``multimodal_driver.py``): every word's feature row is repeated once per word piece of that word, the
  pieces are cut to ``L - 2``, and the special tokens and the padding get zero rows, in the positions the
  tokenizer puts them (``prepare_bert_input``: ``[CLS] pieces [SEP] pad..``; ``prepare_xlnet_input``:
  ``pad.. pieces <sep> <cls>``).
* `WordVocab`: a word-level vocabulary for models trained from scratch (no pretrained tokenizer), built
  from the training split only so validation and test words never leak into it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusionbench.errors import DatasetError

PAD_ID = 0
UNK_ID = 1
WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")

# Lower-case words the fixtures build their sentences from; `save_tiny_pretrained(words=FIXTURE_WORDS)`
# makes a tokenizer that knows all of them.
FIXTURE_WORDS = (
    "i", "you", "it", "this", "that", "the", "a", "movie", "film", "story", "actor", "actors", "plot",
    "ending", "music", "scene", "scenes", "was", "is", "were", "really", "very", "so", "not", "too",
    "quite", "pretty", "just", "and", "but", "of", "good", "great", "awesome", "amazing", "funny", "fun",
    "beautiful", "love", "loved", "like", "liked", "enjoyed", "best", "bad", "boring", "terrible", "awful",
    "sad", "worst", "hate", "hated", "stupid", "slow", "dull", "okay", "fine", "average", "part", "parts",
)  # fmt: skip


def words_of(text: str) -> list[str]:
    """The lower-case word tokens of ``text`` (letters/digits, with an optional ``'s``-style suffix)."""
    return WORD_RE.findall(str(text).lower())


def _tokenizer_help(path: Any, key: str) -> str:
    return (
        f"Put in {path} a folder written by `tokenizer.save_pretrained(DIR)` (and the model by "
        "`model.save_pretrained(DIR)`) on a machine with internet, e.g. "
        "`AutoTokenizer.from_pretrained('bert-base-uncased').save_pretrained(DIR)`, then point "
        f"`{key}` at DIR (the configs take it from `backbone.text.pretrained`); fusionbench never downloads."
    )


def check_tokenizer_dir(path: str | Path | None, key: str = "dataset.tokenizer") -> Path:
    """``path`` as a `Path` if it is a non-empty folder, else a `DatasetError` saying what to put there."""
    if path is None or str(path).strip() == "":
        raise DatasetError(
            f"No tokenizer folder given (`{key}` is empty). {_tokenizer_help('a folder', key)}"
        )
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"Tokenizer folder {folder} does not exist. {_tokenizer_help(folder, key)}")
    if not any(folder.iterdir()):
        raise DatasetError(f"Tokenizer folder {folder} is empty. {_tokenizer_help(folder, key)}")
    return folder


def load_tokenizer(path: str | Path | None, key: str = "dataset.tokenizer") -> Any:
    """``AutoTokenizer.from_pretrained(path, local_files_only=True)``; a missing, empty or unreadable folder
    raises a `DatasetError` that says what to put there and which config key (``key``) points at it."""
    folder = check_tokenizer_dir(path, key)
    from transformers import AutoTokenizer  # slow import: only when a tokenizer is needed

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, ... for unusable folders
        first = str(e).splitlines()[0] if str(e) else ""
        raise DatasetError(
            f"Tokenizer folder {folder} cannot be read by transformers' AutoTokenizer "
            f"({type(e).__name__}: {first}). {_tokenizer_help(folder, key)}"
        ) from None


def stack_tokens(ids: Sequence[Sequence[int]], mask: Sequence[Sequence[int]]) -> torch.Tensor:
    """Ids and masks (N, L) -> the token contract's LongTensor (N, 2, L)."""
    return torch.stack([torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(mask, dtype=torch.long)], 1)


def encode_with_tokenizer(texts: Sequence[str], tokenizer: Any, max_len: int) -> torch.Tensor:
    """Whole texts -> LongTensor (N, 2, max_len): truncated and padded to ``max_len`` by the tokenizer
    (its special-token template and its padding side: XLNet pads on the left)."""
    if not texts:
        return torch.zeros(0, 2, max_len, dtype=torch.long)
    enc = tokenizer([str(t) for t in texts], max_length=max_len, padding="max_length", truncation=True)
    return stack_tokens(enc["input_ids"], enc["attention_mask"])


def tokenizer_lengths(texts: Sequence[str], tokenizer: Any) -> np.ndarray:
    """Untruncated token counts including special tokens (> max_len: the text was cut)."""
    if not texts:
        return np.zeros(0, dtype=np.int64)
    enc = tokenizer([str(t) for t in texts], truncation=False)
    return np.array([len(i) for i in enc["input_ids"]], dtype=np.int64)


def _split_words(words: Sequence[Sequence[str]]) -> list[list[str]]:
    # a word-free sample still gets its special tokens; the tokenizer needs a non-empty list: one empty word
    return [[str(x) for x in w] if len(w) else [""] for w in words]


def word_piece_counts(words: Sequence[Sequence[str]], tokenizer: Any) -> list[int]:
    """Word pieces per sample without special tokens (``> max_len - 2``: MAG cuts the sample)."""
    if not words:
        return []
    enc = tokenizer(_split_words(words), is_split_into_words=True, add_special_tokens=False)
    return [len(i) for i in enc["input_ids"]]


def align_word_features_batch(
    words: Sequence[Sequence[str]], features: Sequence[np.ndarray], tokenizer: Any, max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`align_word_features` for N samples at once: ((N, 2, L) tokens, (N, L, d) float32 features).

    The tokenizer is called on the pre-split words (``is_split_into_words``: each word is tokenised on its
    own, as MAG's ``tokenizer.tokenize(word)``) and its ``word_ids()`` say which word every position came
    from; ``None`` (special token, padding) gets a zero row.
    """
    n = len(words)
    if n != len(features):
        raise DatasetError(f"{n} word lists but {len(features)} feature arrays.")
    if n == 0:
        return torch.zeros(0, 2, max_len, dtype=torch.long), torch.zeros(0, max_len, 0)
    if not getattr(tokenizer, "is_fast", False):
        raise DatasetError(
            f"Word-piece alignment needs a fast (`tokenizers`) tokenizer, not {type(tokenizer).__name__}: "
            "save it with a tokenizer.json (`AutoTokenizer.from_pretrained(NAME).save_pretrained(DIR)`)."
        )
    feats = [np.asarray(f, dtype=np.float32) for f in features]
    d = next((f.shape[1] for f in feats if f.ndim == 2), 0)
    for i, (w, f) in enumerate(zip(words, feats)):
        if f.ndim != 2 or f.shape != (len(w), d):
            raise DatasetError(
                f"Sample {i}: features of shape {f.shape} for {len(w)} words; expected ({len(w)}, {d}) "
                "(one row per word)."
            )
    enc = tokenizer(
        _split_words(words),
        is_split_into_words=True,
        max_length=max_len,
        padding="max_length",
        truncation=True,
    )
    out = np.zeros((n, max_len, d), dtype=np.float32)
    for i in range(n):
        word_ids = enc.word_ids(i)
        pos = [p for p, w in enumerate(word_ids) if w is not None]
        if pos and len(words[i]):
            out[i, pos] = feats[i][[word_ids[p] for p in pos]]
    return stack_tokens(enc["input_ids"], enc["attention_mask"]), torch.from_numpy(out)


def align_word_features(
    words: Sequence[str], features: np.ndarray, tokenizer: Any, max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """MAG's word-piece alignment of one sample: ``words`` (T,) and ``features`` (T, d) ->
    tokens (2, max_len) (ids, mask) and features (max_len, d), each word's row repeated for each of its
    pieces, zero rows at the special tokens and the padding (module docstring)."""
    tokens, feats = align_word_features_batch([words], [features], tokenizer, max_len)
    return tokens[0], feats[0]


class WordVocab:
    """Word-level vocabulary from training texts: id 0 = padding, 1 = unknown, then the words seen at
    least ``min_freq`` times, most frequent first (ties alphabetical, so the ids are reproducible).

    Args:
        texts: the training split's texts (never validation or test).
        min_freq: words seen fewer times map to the unknown id.
    """

    def __init__(self, texts: Iterable[str], min_freq: int = 1) -> None:
        if int(min_freq) < 1:
            raise DatasetError(f"dataset.min_freq must be a positive integer, got {min_freq}.")
        self.min_freq = int(min_freq)
        self.counts = Counter(w for t in texts for w in words_of(t))
        kept = sorted(
            (w for w, c in self.counts.items() if c >= self.min_freq), key=lambda w: (-self.counts[w], w)
        )
        self.itos = ["<pad>", "<unk>", *kept]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @property
    def size(self) -> int:
        """Number of ids, padding and unknown included (an embedding table's ``vocab_size``)."""
        return len(self.itos)

    def __len__(self) -> int:
        return self.size

    def ids(self, text: str) -> list[int]:
        return [self.stoi.get(w, UNK_ID) for w in words_of(text)]

    def encode(self, texts: Sequence[str], max_len: int) -> torch.Tensor:
        """LongTensor (N, 2, max_len): the first ``max_len`` words' ids, padded with 0 after them. A text
        without any word becomes one unknown token, so no row has an all-zero mask."""
        out = torch.zeros(len(texts), 2, max_len, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = self.ids(t)[:max_len] or [UNK_ID]
            out[i, 0, : len(ids)] = torch.tensor(ids)
            out[i, 1, : len(ids)] = 1
        return out

    def oov_rate(self, texts: Sequence[str]) -> float:
        """Fraction of the word tokens of ``texts`` that map to the unknown id."""
        ids = [i for t in texts for i in self.ids(t)]
        return float(np.mean([i == UNK_ID for i in ids])) if ids else 0.0
