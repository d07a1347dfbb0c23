"""VQA accuracy (Antol et al., ICCV 2015; VQA v2, Goyal et al., CVPR 2017).

Answer normalisation is the official evaluation's (github.com/GT-Vision-Lab/VQA,
``PythonEvaluationTools/vqaEvaluation/vqaEval.py``: ``processPunctuation`` then ``processDigitArticle``),
which MCAN (github.com/MILVLG/mcan-vqa, ``core/data/ans_punct.py: prep_ans``) reuses for its training
targets; MCAN's extra ``replace(',', '')`` is a no-op because ``,`` is one of the stripped punctuation marks.

Official accuracy of an answer ``a`` for a question with 10 human answers, ``k`` of which equal ``a`` after
normalisation: the mean over the 10 leave-one-out subsets of ``min(1, matches in the other 9 / 3)``,

    acc(k) = [k * min(1, (k - 1) / 3) + (10 - k) * min(1, k / 3)] / 10 = min(1, 0.3 k),

(k = 0: 0; 1: (0 + 9/3)/10 = 0.3; 2: (2/3 + 16/3)/10 = 0.6; 3: (2 + 7)/10 = 0.9; k >= 4: every term is 1),
so `answer_scores` (MCAN's ``proc_ans`` / ``get_score`` soft scores) is the official accuracy of every
vocabulary answer and the accuracy of a prediction is ``target[argmax(logits)]`` (`VQAAccuracy`).

Known difference from the official script: it normalises the human answers (and the prediction) only when
the 10 answers are not all identical as raw strings; here they are always normalised, as in MCAN's targets.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping

import torch
from torchmetrics import Metric, MetricCollection

ANSWER_TYPES = {"yes/no": 0, "number": 1, "other": 2}  # annotation ``answer_type`` -> meta id; -1 unknown

# vqaEval.py's tables (contractions without apostrophe -> with; number words -> digits; articles dropped)
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = {"a", "an", "the"}
PUNCT = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
# The official pattern, verbatim: its "(?!<=\d)" is a (mistyped) lookahead that always holds before a ".", so
# every period not followed by a digit goes ("3.5" keeps its point, "two." and "1." lose theirs).
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")


def _punctuation(text: str) -> str:
    """vqaEval.processPunctuation: a mark next to a space (or any mark, once the text holds a digit-comma-
    digit number like "1,000") is deleted, otherwise replaced by a space; then periods are deleted."""
    out = text
    drop = COMMA_STRIP.search(text) is not None
    for p in PUNCT:
        out = out.replace(p, "" if drop or (p + " " in text or " " + p in text) else " ")
    # the official call passes re.UNICODE (32) positionally, i.e. as the replacement count
    return PERIOD_STRIP.sub("", out, count=re.UNICODE)


def _digit_article(text: str) -> str:
    """vqaEval.processDigitArticle: lower-case, number words -> digits, drop articles, add apostrophes."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(s: str) -> str:
    """The official normalisation of one answer: newlines and tabs to spaces, strip, then punctuation and
    digit/article/contraction processing ("Two." -> "2", "a dog" -> "dog", "isnt" -> "isn't")."""
    s = s.replace("\n", " ").replace("\t", " ").strip()
    return _digit_article(_punctuation(s))


def answer_scores(answers: Iterable[str], vocab: Mapping[str, int]) -> dict[int, float]:
    """``{vocabulary index: min(1, 0.3 * count)}`` over the normalised human ``answers`` (answers outside
    ``vocab``, a normalised-answer -> index map, score nothing). With the usual 10 answers this equals the
    official leave-one-out accuracy of each answer (module docstring:
    1 -> 0.3, 2 -> 0.6, 3 -> 0.9, 4+ -> 1)."""
    counts = Counter(normalize_answer(a) for a in answers)
    return {vocab[a]: min(1.0, 0.3 * c) for a, c in counts.items() if a in vocab}


class VQAAccuracy(Metric):
    """Mean VQA accuracy of the argmax answer: ``target[i, argmax(preds[i])]`` averaged over the questions
    (all of them, or those of one ``answer_type``: 0 yes/no, 1 number, 2 other). The value is NaN until a
    question of that type was seen."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, answer_type: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if answer_type is not None and answer_type not in ANSWER_TYPES.values():
            raise ValueError(
                f"answer_type must be None or one of {sorted(ANSWER_TYPES.values())}, got {answer_type}"
            )
        self.answer_type = answer_type
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self, preds: torch.Tensor, target: torch.Tensor, answer_type: torch.Tensor | None = None
    ) -> None:
        """``preds`` (B, A) logits or scores, ``target`` (B, A) soft answer scores, ``answer_type`` (B,)."""
        if preds.shape != target.shape or preds.ndim != 2:
            raise ValueError(
                f"preds and target must both be (B, A); got {tuple(preds.shape)}, {tuple(target.shape)}"
            )
        acc = target.gather(1, preds.argmax(dim=1, keepdim=True)).squeeze(1)
        if self.answer_type is not None:
            if answer_type is None:
                raise ValueError(
                    f"VQAAccuracy(answer_type={self.answer_type}) needs the batch's answer_type "
                    "(batch['meta'])."
                )
            acc = acc[answer_type.to(acc.device) == self.answer_type]
        self.total += acc.double().sum()
        self.count += acc.numel()

    def compute(self) -> torch.Tensor:
        if self.count == 0:
            return torch.tensor(float("nan"))
        return (self.total / self.count).float()


def make_vqa_metrics() -> MetricCollection:
    """``vqa_acc`` (all questions) and ``vqa_acc_yesno`` / ``_number`` / ``_other`` (per answer type).

    Compute groups are off: after a batch of only one answer type, two metrics hold equal states and
    torchmetrics would merge them for the rest of the epoch."""
    return MetricCollection(
        {
            "vqa_acc": VQAAccuracy(None),
            "vqa_acc_yesno": VQAAccuracy(ANSWER_TYPES["yes/no"]),
            "vqa_acc_number": VQAAccuracy(ANSWER_TYPES["number"]),
            "vqa_acc_other": VQAAccuracy(ANSWER_TYPES["other"]),
        },
        compute_groups=False,
    )
