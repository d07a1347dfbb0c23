"""VQA v2 (Goyal et al., CVPR 2017) with bottom-up-attention region features, in MCAN's layout
(github.com/MILVLG/mcan-vqa, ``core/data/load_data.py``, ``core/data/data_utils.py``); DEQ fusion's VQA rows.

Files under ``data_dir``::

    v2_OpenEnded_mscoco_{train2014,val2014}_questions.json   {"questions": [{image_id, question,
                                                              question_id}]}
    v2_mscoco_{train2014,val2014}_annotations.json           {"annotations": [{question_id, image_id,
                                                              answer_type, answers: 10 x {answer, ...}, ...}]}
    v2_OpenEnded_mscoco_test-dev2015_questions.json          only with ``predict_split: test-dev``
    feats/{train2014,val2014,test2015}/<name>.npz            one file per image: ``x`` (2048, K) as MCAN's
                                                              files (K x 2048 accepted too), K <= 100 boxes
    answer_dict.json                                         MCAN's ``core/data/answer_dict.json`` (3,129)

A feature file's image id is read as MCAN does (``img_feat_path_load``): the digits after the last ``_``
before the first ``.``, so both ``COCO_train2014_000000000009.jpg.npz`` and ``9.npz`` work.

Splits (the DEQ paper trains on train2014 only and reports val2014; MCAN's Table 4 numbers are test-dev,
which has no public answers):

* ``train`` = train2014 questions, less the images held out by ``val_from_train`` (a fraction of train
  *images*, so no image is in both);
* ``val`` = those held-out questions when ``val_from_train > 0``, else val2014;
* ``test`` = val2014 with labels. With ``val_from_train: 0`` val and test are the same questions: select
  checkpoints on val only with ``val_from_train > 0`` (MCAN trains a fixed schedule and keeps the last epoch);
* ``predict`` (``predict_split: test-dev``) = test-dev2015 questions on test2015 features, unlabeled
  (target zeros, answer type -1); `write_predictions` writes the EvalAI submission file.

Per item (``{"inputs", "target", "meta"}``): ``image`` float (100, 2048), the ``x`` rows of the first
``num_boxes`` boxes then zero rows (MCAN's ``proc_img_feat``; models derive their mask from zero rows),
read from its npz when the item is read (features are never held in memory); ``question`` int64 (14,)
MCAN's ``proc_ques`` ids (lower-case, ``.,'!?"()*#:;`` deleted, ``-`` and ``/`` to spaces, split on
whitespace; 0 padding, 1 unknown) over a vocabulary of the training questions; ``target`` float (3129,)
`fusionbench.metrics.vqa.answer_scores` (MCAN's ``proc_ans``, = official accuracy of each answer); ``meta``
``answer_type`` (0 yes/no, 1 number, 2 other, -1 unknown) and ``question_id``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fusionbench.data.base import FusionDataModule
from fusionbench.errors import DatasetError
from fusionbench.metrics.vqa import ANSWER_TYPES, answer_scores

QUESTIONS = "v2_OpenEnded_mscoco_{}_questions.json"
ANNOTATIONS = "v2_mscoco_{}_annotations.json"
FEATS = {"train2014": "feats/train2014", "val2014": "feats/val2014", "test-dev2015": "feats/test2015"}
SIZES = {"train2014": 443757, "val2014": 214354, "test-dev2015": 107394}  # official question counts
PAD, UNK = "PAD", "UNK"  # MCAN's token_to_ix: ids 0 and 1
MAX_TOKEN, NUM_BOXES, FEAT_DIM = 14, 100, 2048
HOW_TO_GET = (
    "Get the VQA v2 questions and annotations from https://visualqa.org/download.html (unzipped json files, "
    "names kept), the bottom-up-attention features as per-image npz files from the links in "
    "github.com/MILVLG/mcan-vqa's README (unpacked into feats/train2014, feats/val2014, feats/test2015), "
    "and copy core/data/answer_dict.json of that repository as answer_dict.json; fusionbench never "
    "downloads them."
)


def question_words(question: str) -> list[str]:
    """MCAN's tokenisation (``tokenize`` / ``proc_ques``)."""
    text = re.sub(r"([.,'!?\"()*#:;])", "", question.lower())
    return text.replace("-", " ").replace("/", " ").split()


def build_question_vocab(questions: Sequence[str]) -> list[str]:
    """Words in order of first occurrence after ``PAD``, ``UNK`` (MCAN's ``token_to_ix``); index = id."""
    index = {PAD: 0, UNK: 1}
    for q in questions:
        for w in question_words(q):
            index.setdefault(w, len(index))
    return list(index)


def encode_questions(
    questions: Sequence[str], token_to_ix: Mapping[str, int], max_token: int
) -> torch.Tensor:
    """(N, max_token) int64 ids, the first ``max_token`` words, unknown words 1, padding 0."""
    out = torch.zeros(len(questions), max_token, dtype=torch.long)
    for i, q in enumerate(questions):
        ids = [token_to_ix.get(w, 1) for w in question_words(q)[:max_token]]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def read_answer_dict(path: Path) -> list[str]:
    """The answers of MCAN's ``[ans_to_ix, ix_to_ans]`` json, index order."""
    try:
        with open(path) as f:
            ans_to_ix, ix_to_ans = json.load(f)
        answers = [ix_to_ans[str(i)] for i in range(len(ix_to_ans))]
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise DatasetError(
            f"{path} is not MCAN's answer dictionary (a json [answer -> index, index -> answer] pair with "
            f"indices 0..N-1): {type(e).__name__}: {e}. Copy core/data/answer_dict.json of "
            "github.com/MILVLG/mcan-vqa."
        ) from None
    if any(ans_to_ix.get(a) != i for i, a in enumerate(answers)) or len(ans_to_ix) != len(answers):
        raise DatasetError(f"{path}: its two maps are not inverses of each other. Re-copy the file.")
    return answers


def feature_index(folder: Path) -> dict[int, str]:
    """image id -> npz path for every file in ``folder`` (MCAN's ``img_feat_path_load`` id parsing)."""
    out = {}
    with os.scandir(folder) as it:
        for e in it:
            if e.name.endswith(".npz"):
                stem = e.name.split(".")[0].split("_")[-1]
                if stem.isdigit():
                    out[int(stem)] = e.path
    return out


def read_feature(path: str, num_boxes: int, feat_dim: int) -> torch.Tensor:
    """(num_boxes, feat_dim) float32: the file's boxes (MCAN's files are (2048, K): transposed) then zeros."""
    with np.load(path) as f:
        x = np.asarray(f["x"], dtype=np.float32)
    if x.ndim != 2 or feat_dim not in x.shape:
        raise DatasetError(f"{path}: 'x' has shape {x.shape}; expected ({feat_dim}, K) or (K, {feat_dim}).")
    if x.shape[0] == feat_dim and x.shape[1] != feat_dim:
        x = x.T
    out = torch.zeros(num_boxes, feat_dim)
    k = min(len(x), num_boxes)
    out[:k] = torch.from_numpy(np.ascontiguousarray(x[:k]))
    return out


class VQADataset(Dataset):
    """Questions in memory (ids, sparse answer scores, types); features read from their npz per item."""

    def __init__(
        self,
        questions: torch.Tensor,
        feature_paths: Sequence[str],
        scores: Sequence[Mapping[int, float]] | None,
        answer_types: torch.Tensor,
        question_ids: torch.Tensor,
        num_answers: int,
        num_boxes: int = NUM_BOXES,
        feat_dim: int = FEAT_DIM,
        modalities: Sequence[str] = ("image", "question"),
    ) -> None:
        self.questions = questions
        self.feature_paths = list(feature_paths)  # one path string per question, never an array
        self.scores = scores  # None: unlabeled (test-dev)
        self.answer_types = answer_types
        self.question_ids = question_ids
        self.num_answers = num_answers
        self.num_boxes = num_boxes
        self.feat_dim = feat_dim
        self.modalities = list(modalities)

    def __len__(self) -> int:
        return len(self.question_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        inputs = {}
        if "image" in self.modalities:
            inputs["image"] = read_feature(self.feature_paths[i], self.num_boxes, self.feat_dim)
        if "question" in self.modalities:
            inputs["question"] = self.questions[i]
        target = torch.zeros(self.num_answers)
        if self.scores is not None:
            for j, s in self.scores[i].items():
                target[j] = s
        meta = {"answer_type": self.answer_types[i], "question_id": self.question_ids[i]}
        return {"inputs": inputs, "target": target, "meta": meta}


class VQADataModule(FusionDataModule):
    """VQA v2 with bottom-up features; the module docstring gives files, splits and the item format.

    Args:
        answer_dict: MCAN's answer dictionary, relative to ``data_dir`` or absolute; its order is the output
            order (``num_outputs`` = its size, 3,129).
        max_token: question length in words (MCAN 14).
        num_boxes: feature rows per image (MCAN's ``IMG_FEAT_PAD_SIZE`` 100); more boxes are cut.
        feat_dim: feature width (2048).
        val_from_train: fraction of train2014 images held out as ``val`` (0: val = val2014).
        split_seed: seed of that hold-out.
        predict_split: ``null`` or ``test-dev`` (an unlabeled ``predict_dataloader`` on test-dev2015).
        modalities: subset of ``image``, ``question``.
        num_samples: questions per file (``train2014``, ``val2014``, ``test-dev2015``) checked; null skips.
        **kwargs: `FusionDataModule` arguments (``name`` defaults to ``vqa``, ``batch_size`` to MCAN's 64).

    After `setup()`: ``vocab`` (question words, index = id), ``encoder_args`` ``{"question": {"vocab_size":
    V, "vocab": vocab}}`` (the words, for GloVe initialisation), ``answers`` (index -> answer),
    ``train_set`` / ``val_set`` / ``test_set`` (/ ``predict_set``).
    """

    task_type = "vqa"

    def __init__(
        self,
        answer_dict: str | Path = "answer_dict.json",
        max_token: int = MAX_TOKEN,
        num_boxes: int = NUM_BOXES,
        feat_dim: int = FEAT_DIM,
        val_from_train: float = 0.0,
        split_seed: int = 0,
        predict_split: str | None = None,
        modalities: Sequence[str] | None = None,
        num_samples: Mapping[str, int] | None = None,
        **kwargs,
    ) -> None:
        kwargs.setdefault("name", "vqa")
        kwargs.setdefault("batch_size", 64)
        kwargs.setdefault("how_to_get", HOW_TO_GET)
        super().__init__(**kwargs)
        self.answer_dict = str(answer_dict)
        self.max_token, self.num_boxes, self.feat_dim = int(max_token), int(num_boxes), int(feat_dim)
        if min(self.max_token, self.num_boxes, self.feat_dim) < 1:
            raise DatasetError("dataset.max_token, num_boxes and feat_dim must be positive.")
        if not 0.0 <= float(val_from_train) < 1.0:
            raise DatasetError(f"dataset.val_from_train must be in [0, 1), got {val_from_train}.")
        self.val_from_train = float(val_from_train)
        self.split_seed = int(split_seed)
        if predict_split not in (None, "test-dev"):
            raise DatasetError(f"dataset.predict_split must be null or 'test-dev', got {predict_split!r}.")
        self.predict_split = predict_split
        if num_samples is not None and not set(num_samples) <= set(SIZES):
            raise DatasetError(
                f"dataset.num_samples keys must be among {list(SIZES)}, got {sorted(num_samples)}."
            )
        self.num_samples = None if num_samples is None else {k: int(v) for k, v in num_samples.items()}
        self.modalities = self.select_modalities(["image", "question"], modalities)
        widths = {"image": self.num_boxes * self.feat_dim, "question": self.max_token}
        self.input_dims = {m: widths[m] for m in self.modalities}
        self.num_outputs = 0  # the answer dictionary's size, after setup
        self.vocab: list[str] = []
        self.answers: list[str] = []
        self.encoder_args: dict[str, dict[str, Any]] = {}
        self.info: dict[str, Any] = {}

    # -- guard -------------------------------------------------------------------------------
    def _splits(self) -> list[str]:
        return ["train2014", "val2014"] + (["test-dev2015"] if self.predict_split else [])

    def required_files(self) -> list[str]:
        files = [QUESTIONS.format(s) for s in self._splits()]
        files += [ANNOTATIONS.format(s) for s in ("train2014", "val2014")]
        return files + [self.answer_dict]  # an absolute answer_dict stays absolute under data_dir / f

    def check_present(self) -> None:
        super().check_present()
        folders = [FEATS[s] for s in self._splits()] if "image" in self.modalities else []
        missing = [f for f in folders if not (self.data_dir / f).is_dir()]
        if missing:
            raise DatasetError(
                f"Dataset '{self.name}' is incomplete: {len(missing)} feature folder(s) missing in "
                f"{self.data_dir} ({', '.join(missing)}). {self.how_to_get} "
                "Point `paths.data_dir=DIR` (or FUSIONBENCH_DATA_DIR) at the folder that holds it."
            )

    # -- loading -----------------------------------------------------------------------------
    def _read_json(self, name: str, key: str) -> list[dict]:
        path = self.data_dir / name
        try:
            with open(path) as f:
                rows = json.load(f)[key]
        except (ValueError, KeyError, TypeError) as e:
            raise DatasetError(
                f"{path} is not an official VQA v2 file (a json object with a '{key}' list): "
                f"{type(e).__name__}: {e}. {self.how_to_get}"
            ) from None
        return rows

    def _questions(self, split: str) -> list[dict]:
        rows = self._read_json(QUESTIONS.format(split), "questions")
        if (
            self.num_samples is not None
            and split in self.num_samples
            and len(rows) != self.num_samples[split]
        ):
            raise DatasetError(
                f"{self.data_dir / QUESTIONS.format(split)} has {len(rows)} questions, expected "
                f"{self.num_samples[split]} (dataset.num_samples.{split}). Set `dataset.num_samples=null` to "
                "run on other files."
            )
        return rows

    def _annotations(self, split: str, questions: list[dict]) -> dict[int, dict]:
        rows = {a["question_id"]: a for a in self._read_json(ANNOTATIONS.format(split), "annotations")}
        missing = [q["question_id"] for q in questions if q["question_id"] not in rows]
        if missing:
            raise DatasetError(
                f"{self.data_dir / ANNOTATIONS.format(split)} has no annotation for {len(missing)} "
                f"question(s) of {QUESTIONS.format(split)} (first ids {missing[:5]}): the two files "
                "must be the same release."
            )
        return rows

    def _paths(self, split: str, questions: list[dict]) -> list[str]:
        if "image" not in self.modalities:
            return [""] * len(questions)
        index = feature_index(self.data_dir / FEATS[split])
        missing = sorted({q["image_id"] for q in questions if q["image_id"] not in index})
        if missing:
            raise DatasetError(
                f"{self.data_dir / FEATS[split]} has no feature file for {len(missing)} image(s) of "
                f"{QUESTIONS.format(split)} (first image ids {missing[:5]}). {self.how_to_get}"
            )
        return [index[q["image_id"]] for q in questions]

    def _dataset(self, split: str, questions: list[dict], labeled: bool) -> VQADataset:
        ans_to_ix = {a: i for i, a in enumerate(self.answers)}
        scores, types = None, torch.full((len(questions),), -1, dtype=torch.long)
        if labeled:
            ann = self._annotations(split, questions)
            rows = [ann[q["question_id"]] for q in questions]
            scores = [answer_scores([a["answer"] for a in r["answers"]], ans_to_ix) for r in rows]
            types = torch.tensor([ANSWER_TYPES.get(r.get("answer_type"), -1) for r in rows], dtype=torch.long)
            self.info.setdefault("answerable", {})[split] = float(np.mean([bool(s) for s in scores]))
        token_to_ix = {w: i for i, w in enumerate(self.vocab)}
        return VQADataset(
            encode_questions([q["question"] for q in questions], token_to_ix, self.max_token),
            self._paths(split, questions),
            scores,
            types,
            torch.tensor([q["question_id"] for q in questions], dtype=torch.long),
            len(self.answers),
            self.num_boxes,
            self.feat_dim,
            self.modalities,
        )

    def _load(self) -> None:
        self.answers = read_answer_dict(self.data_dir / self.answer_dict)
        self.num_outputs = len(self.answers)
        train = self._questions("train2014")
        val2014 = self._questions("val2014")
        held: list[dict] = []
        if self.val_from_train > 0:  # hold out whole images: no image in both train and val
            images = np.array(sorted({q["image_id"] for q in train}))
            rng = np.random.default_rng(self.split_seed)
            n = max(1, int(round(self.val_from_train * len(images))))
            out = set(rng.permutation(images)[:n].tolist())
            held = [q for q in train if q["image_id"] in out]
            train = [q for q in train if q["image_id"] not in out]
        self.vocab = build_question_vocab([q["question"] for q in train])  # training questions only
        self.encoder_args = {
            "question": {"vocab_size": len(self.vocab), "vocab": list(self.vocab)}
        }  # vocab: GloVe
        self.info.update(vocab_size=len(self.vocab), num_answers=self.num_outputs)
        self.train_set = self._dataset("train2014", train, labeled=True)
        self.test_set = self._dataset("val2014", val2014, labeled=True)
        self.val_set = self._dataset("train2014", held, labeled=True) if held else self.test_set
        if self.predict_split:
            self.predict_set = self._dataset("test-dev2015", self._questions("test-dev2015"), labeled=False)

    def predict_dataloader(self) -> DataLoader:
        if not self.predict_split:
            raise DatasetError("Set `dataset.predict_split=test-dev` for an unlabeled test-dev loader.")
        return self._loader(self.predict_set, shuffle=False)

    def answer_of(self, logits: torch.Tensor) -> list[str]:
        """The vocabulary answer of each row's argmax."""
        return [self.answers[i] for i in logits.argmax(-1).tolist()]


def write_predictions(path: str | Path, question_ids: Sequence[int], answers: Sequence[str]) -> Path:
    """The official results file (EvalAI / vqaEval): ``[{"question_id": int, "answer": str}, ...]``."""
    if len(question_ids) != len(answers):
        raise ValueError(f"{len(question_ids)} question ids but {len(answers)} answers.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"question_id": int(q), "answer": str(a)} for q, a in zip(question_ids, answers)]
    path.write_text(json.dumps(rows))
    return path


# -- fixture ------------------------------------------------------------------------------------
FIXTURE_ANSWERS = ["yes", "no", "2", "3", "dog", "red", "black and white", "cat", "1", "blue"]
# raw forms: spelled-out numbers, articles, capitals, punctuation, and answers outside any vocabulary
FIXTURE_RAW = [
    "Yes",
    "no",
    "Two.",
    "2",
    "three",
    "a dog",
    "Red!",
    "black and white",
    "the cat",
    "zxqv widget",
]
FIXTURE_WORDS = "what is the color of dog how many cats are there on table man's shirt does it rain".split()


def write_fixture(
    folder: str | Path,
    n_images: int = 4,
    n_questions: int = 20,
    seed: int = 0,
    answer_dict: str | Path | None = None,
) -> Path:
    """Tiny VQA v2 in the real layout: question/annotation jsons for train2014, val2014 and test-dev2015
    (``n_questions`` each, 10 answers per labeled question), MCAN-named npz features (``x`` (2048, K),
    ``bbox`` (K, 4), K in 3..10) for ``n_images`` images per split, and ``answer_dict.json`` (a copy of
    ``answer_dict`` if given, else a 10-answer dictionary in MCAN's format)."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    if answer_dict is not None:
        (folder / "answer_dict.json").parent.mkdir(parents=True, exist_ok=True)
        (folder / "answer_dict.json").write_bytes(Path(answer_dict).read_bytes())
    else:
        folder.mkdir(parents=True, exist_ok=True)
        pair = [
            {a: i for i, a in enumerate(FIXTURE_ANSWERS)},
            {str(i): a for i, a in enumerate(FIXTURE_ANSWERS)},
        ]
        (folder / "answer_dict.json").write_text(json.dumps(pair))
    types = ["yes/no", "number", "other"]
    for k, split in enumerate(("train2014", "val2014", "test-dev2015")):
        feat_split = Path(FEATS[split]).name
        feat_dir = folder / FEATS[split]
        feat_dir.mkdir(parents=True, exist_ok=True)
        image_ids = [1000 * (k + 1) + i for i in range(n_images)]
        for iid in image_ids:
            n = int(rng.integers(3, 11))
            np.savez(
                feat_dir / f"COCO_{feat_split}_{iid:012d}.jpg.npz",
                x=rng.random((FEAT_DIM, n), dtype=np.float32) + 0.01,  # no all-zero box row
                bbox=rng.random((n, 4), dtype=np.float32),
            )
        questions, annotations = [], []
        for j in range(n_questions):
            qid = (k + 1) * 100000 + j
            iid = image_ids[j % n_images]
            words = rng.choice(FIXTURE_WORDS, size=int(rng.integers(3, 18))).tolist()
            if split != "train2014":
                words.append(f"unseen{j}")  # a word never in train: id 1
            questions.append(
                {"image_id": iid, "question": " ".join(words).capitalize() + "?", "question_id": qid}
            )
            answers = rng.choice(FIXTURE_RAW, size=10).tolist()
            annotations.append(
                {
                    "question_id": qid,
                    "image_id": iid,
                    "question_type": "what is",
                    "answer_type": types[j % 3],
                    "multiple_choice_answer": answers[0],
                    "answers": [
                        {"answer": a, "answer_confidence": "yes", "answer_id": n + 1}
                        for n, a in enumerate(answers)
                    ],
                }
            )
        info = {"task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": split}
        (folder / QUESTIONS.format(split)).write_text(json.dumps({**info, "questions": questions}))
        if split != "test-dev2015":
            (folder / ANNOTATIONS.format(split)).write_text(json.dumps({**info, "annotations": annotations}))
    return folder
