"""Raw MM-IMDB: posters and plots from ``mmimdb.tar.gz`` (Arevalo et al. 2017; DEQ's BERT + ResNet-152 runs).

Layout under ``data_dir`` (the archive extracted as is; archive.org item ``mmimdb``)::

    mmimdb/split.json             {"train": [ids], "dev": [ids], "test": [ids]}  (15,552 / 2,608 / 7,799)
    mmimdb/dataset/<id>.json      movie metadata: ``plot`` (list of strings), ``genres`` (list), ...
    mmimdb/dataset/<id>.jpeg      the poster

Ids are 7-digit IMDb ids (strings; an integer id is written back with its leading zeros). Our split names
are ``train`` / ``val`` / ``test``; ``val`` is ``dev``.

Per movie, as jinhong-ni/DEQFusion ``experiments/MM-IMDB/datasets/imdb/get_data.py`` (``IMDBRawDataset``)
and johnarevalo/gmu-mmimdb ``make_dataset.py``:

* text: the longest string of ``plot`` (the first when tied: numpy ``argmax`` of the lengths), tokenised
  whole by a local tokenizer folder (bert-base-uncased in DEQ; ``[CLS] .. [SEP]``, cut and zero-padded to
  ``max_len`` = 512 as DEQ's ``max_seq_length``) into the token modality (2, L): ids and attention mask
  (`fusionbench.data.text`).
* image: the poster as RGB, ``Resize(256)`` (shorter side), ``CenterCrop(224)``, ``ToTensor``,
  ``Normalize`` with the ImageNet mean / std: DEQ's transform, which is also the preprocessing of
  torchvision's ImageNet weights for VGG-16 and ResNet-152 (IMAGENET1K_V1). Float (3, 224, 224).
  (gmu-mmimdb's own VGG features used a Caffe-style aspect-fit crop to 224 x 224 with BGR mean
  subtraction; not reproduced.)
* target: multi-hot over the 23 genres of the feature file (`fusionbench.data.mmimdb.GENRES`, in that
  order); other genres are ignored. The archive has 27: DEQ drops News, Adult, Talk-Show and Reality-TV,
  gmu-mmimdb keeps the 23 most frequent; both leave the same 23. A movie with none of them has an all-zero
  target (the public code keeps it too).

Loading is lazy: `setup()` reads ``split.json`` and checks that every listed json and poster exists (a
`DatasetError` names the missing files and where to get the archive); ``__getitem__`` reads the json,
decodes the poster and tokenises the plot. The content hash in the run record covers ``split.json`` only
(hashing 26k posters at every start would cost more than the run's first batches).

Task: 23 outputs, multi-label (BCE on logits, micro / macro F1 at 0.5), selection on ``val/f1_macro``
(max), as ``dataset=mmimdb``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fusionbench.data.base import FusionDataModule
from fusionbench.data.mmimdb import GENRES, SPLITS, check_sizes
from fusionbench.data.text import FIXTURE_WORDS, check_tokenizer_dir, encode_with_tokenizer, load_tokenizer
from fusionbench.errors import DatasetError

ROOT = "mmimdb"  # the archive's top folder
SPLIT_FILE = "split.json"
FILE_SPLIT_NAMES = {"train": "train", "val": "dev", "test": "test"}  # ours -> split.json's keys
DROPPED = ("News", "Adult", "Talk-Show", "Reality-TV")  # the archive's 4 rare genres outside GENRES
MAX_LEN = 512  # DEQ's max_seq_length (BERT's position limit)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOW_TO_GET = (
    "Download mmimdb.tar.gz (archive.org item 'mmimdb', linked from the README of johnarevalo/gmu-mmimdb; "
    "about 8 GB) and extract it in this folder (it creates mmimdb/split.json and mmimdb/dataset/); "
    "fusionbench never downloads it."
)
MAX_LISTED = 10  # missing files named in an error


def movie_id(x: Any) -> str:
    """An id of ``split.json`` as the file stem: strings as they are, integers with 7 digits."""
    return f"{x:07d}" if isinstance(x, (int, np.integer)) and not isinstance(x, bool) else str(x)


def longest_plot(plots: Any, path: Path) -> str:
    """The longest string of a movie's ``plot`` list (the first when tied), as both public loaders."""
    if isinstance(plots, str):
        plots = [plots]
    if not isinstance(plots, list) or not plots or not all(isinstance(p, str) for p in plots):
        raise DatasetError(
            f"{path}: 'plot' must be a non-empty list of strings (the raw MM-IMDB json), got "
            f"{type(plots).__name__}."
        )
    return plots[int(np.argmax([len(p) for p in plots]))]


def genre_target(genres: Any, path: Path) -> torch.Tensor:
    """Multi-hot float (23,) over `GENRES`; genres outside them are ignored."""
    if not isinstance(genres, list):
        raise DatasetError(f"{path}: 'genres' must be a list of genre names, got {type(genres).__name__}.")
    y = torch.zeros(len(GENRES))
    for g in genres:
        if g in GENRES:
            y[GENRES.index(g)] = 1.0
    return y


def image_transform(image_size: int = 224, resize: int = 256, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """DEQ's (= torchvision's ImageNet evaluation) transform: shorter side to ``resize``, centre crop,
    normalise."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(int(resize)),
            transforms.CenterCrop(int(image_size)),
            transforms.ToTensor(),
            transforms.Normalize(mean=list(mean), std=list(std)),
        ]
    )


class RawMovies(Dataset):
    """One split: ``ids`` read lazily from ``folder`` (``<id>.json`` and ``<id>.jpeg``)."""

    def __init__(
        self,
        folder: Path,
        ids: Sequence[str],
        modalities: Sequence[str],
        tokenizer: Any,
        max_len: int,
        transform,
    ) -> None:
        self.folder, self.ids, self.modalities = folder, list(ids), list(modalities)
        self.tokenizer, self.max_len, self.transform = tokenizer, int(max_len), transform

    def __len__(self) -> int:
        return len(self.ids)

    def read_json(self, i: int) -> tuple[dict, Path]:
        path = self.folder / f"{self.ids[i]}.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise DatasetError(f"{path} is not a readable json file ({type(e).__name__}: {e}).") from None
        if (
            not isinstance(data, dict)
            or "genres" not in data
            or ("text" in self.modalities and "plot" not in data)
        ):
            raise DatasetError(f"{path} has no 'genres' or 'plot' (a raw MM-IMDB movie json has both).")
        return data, path

    def poster(self, i: int) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        path = self.folder / f"{self.ids[i]}.jpeg"
        try:
            with Image.open(path) as im:
                rgb = im.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise DatasetError(f"{path} cannot be decoded as an image ({type(e).__name__}: {e}).") from None
        return self.transform(rgb)

    def text(self, i: int) -> str:
        data, path = self.read_json(i)
        return longest_plot(data["plot"], path)

    def __getitem__(self, i: int) -> dict[str, Any]:
        data, path = self.read_json(i)
        inputs = {}
        if "image" in self.modalities:
            inputs["image"] = self.poster(i)
        if "text" in self.modalities:
            inputs["text"] = encode_with_tokenizer(
                [longest_plot(data["plot"], path)], self.tokenizer, self.max_len
            )[0]
        return {"inputs": inputs, "target": genre_target(data["genres"], path)}


class MMIMDBRawDataModule(FusionDataModule):
    """Movie genre prediction (23 genres, multi-label) from the raw poster and the longest plot.

    Args:
        tokenizer: a local tokenizer folder (``tokenizer.save_pretrained(DIR)``; the configs take
            ``backbone.text.pretrained``). Needed with the text modality only.
        max_len: token positions L (512, DEQ's ``max_seq_length``).
        image_size: side of the centre crop (224).
        resize: the shorter side before cropping (256).
        mean, std: per-channel normalisation (ImageNet's, as torchvision's weights expect).
        modalities: subset of ``[image, text]`` (default both).
        num_samples: expected movies per split ``{"train": n, "val": n, "test": n}`` (the configs give
            15,552 / 2,608 / 7,799); ``None`` skips the check.
        root: the archive's top folder inside ``data_dir`` (``mmimdb``).
        **kwargs: `FusionDataModule` arguments (``name`` defaults to ``mmimdb_raw``, ``batch_size`` to 16
            as DEQ, ``monitor`` to ``val/f1_macro``/``max``).
    """

    task_type = "multilabel"
    num_outputs = len(GENRES)

    def __init__(
        self,
        tokenizer: str | None = None,
        max_len: int = MAX_LEN,
        image_size: int = 224,
        resize: int = 256,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        modalities: Sequence[str] | None = None,
        num_samples: Mapping[str, int] | None = None,
        root: str = ROOT,
        **kwargs,
    ) -> None:
        kwargs.setdefault("name", "mmimdb_raw")
        kwargs.setdefault("batch_size", 16)
        kwargs.setdefault("monitor", {"metric": "val/f1_macro", "mode": "max"})
        kwargs.setdefault("how_to_get", HOW_TO_GET)
        super().__init__(**kwargs)
        self.tokenizer = None if tokenizer is None else str(tokenizer)
        self.max_len, self.image_size, self.resize = int(max_len), int(image_size), int(resize)
        if self.max_len < 3:
            raise DatasetError(f"dataset.max_len must be at least 3 ([CLS], a token, [SEP]), got {max_len}.")
        if not 0 < self.image_size <= self.resize:
            raise DatasetError(
                f"dataset.image_size={image_size} must be positive and at most dataset.resize={resize}."
            )
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if len(self.mean) != 3 or len(self.std) != 3:
            raise DatasetError("dataset.mean and dataset.std need 3 values (R, G, B).")
        self.modalities = self.select_modalities(["image", "text"], modalities)
        widths = {"image": 3 * self.image_size**2, "text": 2 * self.max_len}  # flattened per-sample sizes
        self.input_dims = {m: widths[m] for m in self.modalities}
        self.num_samples = (
            None if num_samples is None else check_sizes(num_samples, list(SPLITS), "movie counts")
        )
        self.root = str(root)
        self.encoder_args: dict[str, dict[str, Any]] = {}
        self.info: dict[str, Any] = {}

    @property
    def folder(self) -> Path:
        return self.data_dir / self.root

    def required_files(self) -> list[str]:
        return [f"{self.root}/{SPLIT_FILE}"]

    def check_present(self) -> None:
        super().check_present()
        if "text" in self.modalities:
            check_tokenizer_dir(self.tokenizer)

    def read_split(self) -> dict[str, list[str]]:
        """``split.json`` as ``{train, val, test: [ids]}``, checked against ``num_samples``."""
        path = self.folder / SPLIT_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise DatasetError(
                f"{path} is not a readable json file ({type(e).__name__}: {e}). {self.how_to_get}"
            ) from None
        keys = list(FILE_SPLIT_NAMES.values())
        if not isinstance(data, dict) or any(not isinstance(data.get(k), list) for k in keys):
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise DatasetError(
                f"{path} must hold lists of movie ids under {keys} (mmimdb.tar.gz's split.json), got {got}. "
                f"{self.how_to_get}"
            )
        out = {s: [movie_id(x) for x in data[k]] for s, k in FILE_SPLIT_NAMES.items()}
        sizes = {s: len(v) for s, v in out.items()}
        if self.num_samples is not None and sizes != self.num_samples:
            raise DatasetError(
                f"{path} lists {sizes} movies, but dataset.num_samples expects {self.num_samples} (the "
                "archive: 15552 / 2608 / 7799). Set `dataset.num_samples` to the file's sizes, or null to "
                "skip the check."
            )
        return out

    def check_items(self, ids: Mapping[str, Sequence[str]]) -> None:
        """Every listed movie has its json (and poster with the image modality), else a `DatasetError` in
        the base guard's words, naming the first missing files."""
        exts = [".json"] + ([".jpeg"] if "image" in self.modalities else [])
        dataset = self.folder / "dataset"
        missing = [
            f"{self.root}/dataset/{i}{e}"
            for s in SPLITS
            for i in ids[s]
            for e in exts
            if not (dataset / f"{i}{e}").is_file()
        ]
        if missing:
            shown = ", ".join(missing[:MAX_LISTED]) + (
                f", ... ({len(missing) - MAX_LISTED} more)" if len(missing) > MAX_LISTED else ""
            )
            raise DatasetError(
                f"Dataset '{self.name}' is incomplete: {len(missing)} file(s) missing in {self.data_dir} "
                f"({shown}). {self.how_to_get} Point `paths.data_dir=DIR` (or FUSIONBENCH_DATA_DIR) at the "
                "folder that holds it."
            )

    def _load(self) -> None:
        ids = self.read_split()
        self.check_items(ids)
        tokenizer = load_tokenizer(self.tokenizer) if "text" in self.modalities else None
        transform = image_transform(self.image_size, self.resize, self.mean, self.std)
        sets = {
            s: RawMovies(self.folder / "dataset", ids[s], self.modalities, tokenizer, self.max_len, transform)
            for s in SPLITS
        }
        self.train_set, self.val_set, self.test_set = sets["train"], sets["val"], sets["test"]
        self.info = {
            "sizes": {s: len(v) for s, v in ids.items()},
            "vocab_size": None if tokenizer is None else len(tokenizer),
        }

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["mmimdb_raw"] = {
            "genres": list(GENRES),
            "max_len": self.max_len,
            "image": {"resize": self.resize, "crop": self.image_size, "mean": self.mean, "std": self.std},
            **self.info,
        }
        return out


def write_fixture(
    folder: str | Path, sizes: Mapping[str, int] | None = None, seed: int = 0, root: str = ROOT
) -> Path:
    """Write the raw archive's layout under ``folder`` (``root/split.json``, ``root/dataset/<id>.json`` and
    ``<id>.jpeg``) with ``sizes`` movies per split (default 12 / 4 / 4); returns ``folder``.

    Posters are tiny jpegs (24-40 px wide, 36-60 high) whose colour depends on the genres; plots are 1-3
    strings of `FIXTURE_WORDS` (so `save_tiny_pretrained(words=FIXTURE_WORDS)` knows every word); about a
    quarter of the movies also carry one of the 4 genres outside the 23 (``DROPPED``).
    """
    from PIL import Image

    sizes = check_sizes(sizes or {"train": 12, "val": 4, "test": 4}, list(SPLITS), "movie counts")
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    dataset = folder / root / "dataset"
    dataset.mkdir(parents=True, exist_ok=True)
    colours = rng.integers(0, 256, (len(GENRES), 3))
    split, n = {}, 0
    for s in SPLITS:
        ids = []
        for _ in range(sizes[s]):
            n += 1
            mid = f"{1000000 + n * 37:07d}"
            picked = sorted(set(rng.choice(len(GENRES), int(rng.integers(1, 4)), replace=False).tolist()))
            genres = [GENRES[k] for k in picked]
            if rng.random() < 0.25:
                genres.insert(int(rng.integers(0, len(genres) + 1)), DROPPED[int(rng.integers(len(DROPPED)))])
            plots = [
                " ".join(rng.choice(FIXTURE_WORDS, int(rng.integers(3, 20))).tolist()).capitalize() + "."
                for _ in range(int(rng.integers(1, 4)))
            ]
            meta = {
                "title": f"Movie {n}",
                "genres": genres,
                "plot": plots,
                "plot outline": plots[0],
                "year": 2000,
            }
            (dataset / f"{mid}.json").write_text(json.dumps(meta), encoding="utf-8")
            w, h = int(rng.integers(24, 41)), int(rng.integers(36, 61))
            base = colours[picked].mean(axis=0)
            pixels = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "RGB").save(dataset / f"{mid}.jpeg", format="JPEG")
            ids.append(mid)
        split[FILE_SPLIT_NAMES[s]] = ids
    (folder / root / SPLIT_FILE).write_text(json.dumps(split), encoding="utf-8")
    return folder
