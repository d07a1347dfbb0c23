"""VQA v2: the official answer normalisation and accuracy (`fusionbench.metrics.vqa`) and the datamodule on a
fixture in the real layout (official jsons, MCAN's per-image npz features, MCAN's answer dictionary)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import compose_cfg
from hydra.utils import instantiate

from fusionbench import ROOT
from fusionbench.data import VQADataModule
from fusionbench.data import vqa as vqa_data
from fusionbench.errors import DatasetError
from fusionbench.metrics.vqa import VQAAccuracy, answer_scores, make_vqa_metrics, normalize_answer

REAL_DICT = ROOT.parent / "shared" / "data" / "vqa_v2" / "mcan_answer_dict.json"


# -- metric ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two.", "2"),
        ("a dog", "dog"),
        ("isnt", "isn't"),
        ("2", "2"),
        ("  The Red\tCar\n", "red car"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("1,000", "1000"),  # digit-comma-digit: every mark is deleted
        ("red,blue", "red blue"),  # no space next to the comma: it becomes a space
        ("red, blue", "red blue"),  # a space next to it: deleted
        ("t-shirt", "t shirt"),
        ("yes!", "yes"),
        ("none", "0"),
        ("One Two three", "1 2 3"),
        ("dont know", "don't know"),
        ("an apple.", "apple"),
    ],
)
def test_normalize_answer_official_cases(raw, expected):
    assert normalize_answer(raw) == expected


def official_accuracy(humans: list[str], answer: str) -> float:
    """vqaEval.py's loop: for each human answer, min(1, matches among the other 9 / 3); the mean."""
    accs = []
    for i in range(len(humans)):
        others = humans[:i] + humans[i + 1 :]
        accs.append(min(1.0, sum(h == answer for h in others) / 3))
    return sum(accs) / len(accs)


@pytest.mark.parametrize("k", range(11))
def test_soft_score_equals_leave_one_out_accuracy(k):
    humans = ["2"] * k + ["3"] * (10 - k)
    scores = answer_scores(humans, {"2": 0, "3": 1})
    assert scores.get(0, 0.0) == pytest.approx(official_accuracy(humans, "2"))
    assert scores.get(0, 0.0) == pytest.approx(min(1.0, 0.3 * k))


def test_answer_scores_normalise_and_drop_unknown():
    humans = ["Two.", "2", "two", "2", "3", "three", "a dog", "yes", "xylophone", "2"]
    assert answer_scores(humans, {"2": 0, "3": 1, "dog": 2, "yes": 3, "no": 4}) == pytest.approx(
        {0: 1.0, 1: 0.6, 2: 0.3, 3: 0.3}
    )


def test_vqa_accuracy_overall_and_per_type():
    metrics = make_vqa_metrics()
    assert sorted(metrics) == ["vqa_acc", "vqa_acc_number", "vqa_acc_other", "vqa_acc_yesno"]
    target = torch.tensor([[1.0, 0.3, 0.0], [0.0, 0.6, 0.9], [0.3, 0.0, 0.0]])
    preds = torch.tensor([[5.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 2.0, 1.0]])  # picks 1.0, 0.6, 0.0
    # first batch: type 2 only (equal states of vqa_acc and vqa_acc_other must not merge them)
    metrics.update(preds[:1], target[:1], answer_type=torch.tensor([2]), question_id=torch.tensor([7]))
    metrics.update(preds[1:], target[1:], answer_type=torch.tensor([0, 1]), question_id=torch.tensor([8, 9]))
    out = {k: float(v) for k, v in metrics.compute().items()}
    assert out["vqa_acc"] == pytest.approx(1.6 / 3)
    assert out["vqa_acc_other"] == pytest.approx(1.0)
    assert out["vqa_acc_yesno"] == pytest.approx(0.6)
    assert out["vqa_acc_number"] == pytest.approx(0.0)
    m = VQAAccuracy(1)
    with pytest.raises(ValueError, match="answer_type"):
        m.update(preds, target)
    with pytest.warns(UserWarning, match="before the ``update``"):  # NaN until a question is seen
        assert torch.isnan(VQAAccuracy(0).compute())


# -- datamodule -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vqa")
    return vqa_data.write_fixture(
        folder, n_images=4, n_questions=20, seed=0, answer_dict=REAL_DICT if REAL_DICT.is_file() else None
    )


def module(folder, **kwargs) -> VQADataModule:
    dm = VQADataModule(data_dir=folder, batch_size=kwargs.pop("batch_size", 8), **kwargs)
    dm.setup()
    return dm


def test_fixture_batch_contract(fixture_dir):
    dm = module(fixture_dir)
    n_ans = 3129 if REAL_DICT.is_file() else len(vqa_data.FIXTURE_ANSWERS)
    assert dm.task_type == "vqa" and dm.num_outputs == n_ans and dm.modalities == ["image", "question"]
    assert dm.input_dims == {"image": 100 * 2048, "question": 14}
    assert dm.encoder_args == {"question": {"vocab_size": len(dm.vocab), "vocab": dm.vocab}}
    assert dm.vocab[:2] == ["PAD", "UNK"]
    assert [len(dm.train_set), len(dm.val_set), len(dm.test_set)] == [20, 20, 20]
    batch = next(iter(dm.train_dataloader()))
    assert (
        batch["inputs"]["image"].shape == (8, 100, 2048) and batch["inputs"]["image"].dtype == torch.float32
    )
    assert batch["inputs"]["question"].shape == (8, 14) and batch["inputs"]["question"].dtype == torch.long
    assert batch["target"].shape == (8, n_ans) and batch["target"].dtype == torch.float32
    assert batch["meta"]["answer_type"].shape == (8,) and batch["meta"]["question_id"].dtype == torch.long
    # boxes: 3..10 real rows, then zero rows (MCAN's mask)
    real = batch["inputs"]["image"].abs().sum(-1) > 0
    assert ((real.sum(1) >= 3) & (real.sum(1) <= 10)).all()
    assert (real[:, :3].all(1)).all() and not real[:, 10:].any()


def test_features_match_npz_and_layout(fixture_dir, tmp_path):
    dm = module(fixture_dir)
    path = dm.train_set.feature_paths[0]
    x = np.load(path)["x"]  # MCAN's (2048, K)
    item = dm.train_set[0]["inputs"]["image"]
    assert torch.equal(item[: x.shape[1]], torch.from_numpy(x.T)) and not item[x.shape[1] :].any()
    # (K, 2048) files and plain <image_id>.npz names read the same
    np.savez(tmp_path / "9.npz", x=x.T)
    assert vqa_data.feature_index(tmp_path) == {9: str(tmp_path / "9.npz")}
    assert torch.equal(vqa_data.read_feature(str(tmp_path / "9.npz"), 100, 2048), item)
    many = np.ones((2048, 120), dtype=np.float32)
    np.savez(tmp_path / "10.npz", x=many)
    assert vqa_data.read_feature(str(tmp_path / "10.npz"), 100, 2048).shape == (100, 2048)  # cut at 100


def test_features_read_lazily(fixture_dir, monkeypatch):
    calls = []
    real_load = np.load
    monkeypatch.setattr(vqa_data.np, "load", lambda *a, **k: calls.append(a[0]) or real_load(*a, **k))
    dm = module(fixture_dir)
    assert calls == []  # setup reads no feature file
    assert all(isinstance(p, str) for p in dm.train_set.feature_paths)
    assert not any(
        isinstance(v, (np.ndarray, torch.Tensor)) and v.ndim >= 2 and v.shape[-1] == 2048
        for v in vars(dm.train_set).values()
    )
    dm.train_set[3]
    dm.test_set[0]
    assert len(calls) == 2


def test_targets_equal_hand_computed_scores(tmp_path):
    folder = vqa_data.write_fixture(tmp_path, n_images=2, n_questions=6, seed=1)  # the 10-answer fixture dict
    path = folder / vqa_data.ANNOTATIONS.format("train2014")
    data = json.loads(path.read_text())
    humans = ["Two.", "2", "two", "2", "3", "three", "a dog", "yes", "xylophone", "2"]
    data["annotations"][0]["answers"] = [
        {"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(humans)
    ]
    data["annotations"][1]["answers"] = [
        {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
        for i, a in enumerate(["No"] * 3 + ["zxqv"] * 7)
    ]
    path.write_text(json.dumps(data))
    dm = module(folder)
    ix = {a: i for i, a in enumerate(dm.answers)}
    expected = torch.zeros(len(dm.answers))
    expected[ix["2"]], expected[ix["3"]], expected[ix["dog"]], expected[ix["yes"]] = 1.0, 0.6, 0.3, 0.3
    assert torch.allclose(dm.train_set[0]["target"], expected)
    expected = torch.zeros(len(dm.answers))
    expected[ix["no"]] = 0.9
    assert torch.allclose(dm.train_set[1]["target"], expected)
    # answer types follow the annotation (fixture: yes/no, number, other in turn)
    assert dm.train_set.answer_types[:6].tolist() == [0, 1, 2, 0, 1, 2]
    assert dm.train_set[4]["meta"]["question_id"] == data["annotations"][4]["question_id"]


def test_question_vocab_from_train_only(fixture_dir):
    dm = module(fixture_dir)
    assert not any(w.startswith("unseen") for w in dm.vocab)  # val questions carry unseen<j> words
    q = dm.test_set[0]["inputs"]["question"]
    train_q = json.loads((fixture_dir / vqa_data.QUESTIONS.format("train2014")).read_text())["questions"][0]
    words = vqa_data.question_words(train_q["question"])[:14]
    assert dm.train_set[0]["inputs"]["question"][: len(words)].tolist() == [dm.vocab.index(w) for w in words]
    assert (q == 1).any()  # the unseen word is unknown
    assert vqa_data.question_words("What's the man's T-shirt/hat colour?") == [
        "whats",
        "the",
        "mans",
        "t",
        "shirt",
        "hat",
        "colour",
    ]


def test_val_from_train_holds_out_images(fixture_dir):
    dm = module(fixture_dir, val_from_train=0.25)
    train_ids = {int(q) for q in dm.train_set.question_ids}
    val_ids = {int(q) for q in dm.val_set.question_ids}
    assert len(train_ids) + len(val_ids) == 20 and not train_ids & val_ids
    assert set(dm.train_set.feature_paths).isdisjoint(dm.val_set.feature_paths)
    assert dm.test_set is not dm.val_set and len(dm.test_set) == 20


def test_test_dev_predictions(fixture_dir, tmp_path):
    dm = module(fixture_dir, predict_split="test-dev")
    batch = next(iter(dm.predict_dataloader()))
    assert (batch["meta"]["answer_type"] == -1).all() and not batch["target"].any()
    answers = dm.answer_of(torch.randn(len(batch["target"]), dm.num_outputs))
    out = vqa_data.write_predictions(tmp_path / "res.json", batch["meta"]["question_id"].tolist(), answers)
    rows = json.loads(out.read_text())
    assert rows[0] == {"question_id": int(batch["meta"]["question_id"][0]), "answer": answers[0]}
    assert all(type(r["question_id"]) is int and type(r["answer"]) is str for r in rows)
    with pytest.raises(DatasetError, match="predict_split"):
        module(fixture_dir).predict_dataloader()


def test_missing_files_and_bad_options(tmp_path, fixture_dir):
    with pytest.raises(DatasetError, match=r"v2_mscoco_train2014_annotations\.json.*visualqa\.org") as e:
        module(tmp_path)
    assert "answer_dict.json" in str(e.value)
    # jsons present, features missing
    for f in fixture_dir.glob("*.json"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    with pytest.raises(DatasetError, match=r"feats/train2014.*mcan-vqa"):
        module(tmp_path)
    with pytest.raises(DatasetError, match="predict_split"):
        VQADataModule(data_dir=tmp_path, predict_split="test")
    with pytest.raises(DatasetError, match="expected 443757"):
        module(fixture_dir, num_samples={"train2014": 443757})
    (tmp_path / "feats" / "train2014").mkdir(parents=True)
    (tmp_path / "feats" / "val2014").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no feature file for 4 image"):
        module(tmp_path)


def test_config_composes(fixture_dir):
    cfg = compose_cfg(["dataset=vqa", f"dataset.data_dir={fixture_dir}", "dataset.num_samples=null"])
    dm = instantiate(cfg.dataset, _convert_="all")
    assert (
        isinstance(dm, VQADataModule) and dm.batch_size == 64 and dm.max_token == 14 and dm.num_boxes == 100
    )
    if REAL_DICT.is_file():  # the fixture holds the real dictionary: its checksum matches
        dm.setup()
        assert dm.num_outputs == 3129
