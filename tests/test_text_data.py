"""Text datasets: CM-BERT's MOSI files (tsv transcripts + BERT-aligned audio pickle), the MAG-BERT
word-aligned pickle, and the tokenisation they share (`fusionbench.data.text`); fixtures in the real on-disk
formats."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch
from conftest import compose_cfg
from hydra.utils import instantiate

from fusionbench import ROOT
from fusionbench.data import CMBERTMOSIDataModule, MAGDataModule
from fusionbench.data import mag as mag_data
from fusionbench.data import mosi_cmbert as cmbert
from fusionbench.data.text import (
    FIXTURE_WORDS,
    PAD_ID,
    UNK_ID,
    WordVocab,
    align_word_features,
    encode_with_tokenizer,
    load_tokenizer,
)
from fusionbench.errors import DatasetError

REAL_TSVS = ROOT.parent / "shared" / "data" / "cmu_mosi" / "cmbert_text"
SIZES = {"train": 24, "val": 8, "test": 8}  # the fixtures'


def cmbert_module(folder, **kwargs) -> CMBERTMOSIDataModule:
    kwargs.setdefault("num_samples", SIZES)
    dm = CMBERTMOSIDataModule(data_dir=folder, **kwargs)
    dm.setup()
    return dm


def write_texts(folder, splits: dict[str, list[tuple[str, float]]]) -> None:
    for split, rows in splits.items():
        cmbert.write_tsv(folder / cmbert.TEXT_FILES[split], [t for t, _ in rows], [y for _, y in rows])


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A tiny BERT folder (model + WordPiece tokenizer of FIXTURE_WORDS) as users' save_pretrained folders."""
    from fusionbench.encoders.pretrained import save_tiny_pretrained

    return save_tiny_pretrained(tmp_path_factory.mktemp("pretrained") / "tiny", words=FIXTURE_WORDS)


@pytest.fixture(scope="module")
def tiny_xlnet_tokenizer():
    """An in-memory XLNet (SentencePiece unigram) tokenizer: ``<sep> <cls>`` last, padding on the left."""
    from transformers import XLNetTokenizer

    specials = ["<unk>", "<s>", "</s>", "<cls>", "<sep>", "<pad>", "<mask>", "<eod>", "<eop>"]
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = [(s, 0.0) for s in specials] + [("▁" + w, -1.0) for w in ("the", "good", "movie")]
    vocab += [("▁", -2.0)] + [(c, -3.0) for c in letters] + [("▁" + c, -3.0) for c in letters]
    return XLNetTokenizer(vocab=vocab, unk_id=0)


# -- CM-BERT layout, word vocabulary ---------------------------------------------------------------
def test_cmbert_fixture_loads_with_the_token_contract_and_aligned_audio(tmp_path):
    cmbert.write_fixture(tmp_path)
    dm = cmbert_module(tmp_path)
    assert dm.modalities == ["audio", "text"] and dm.task_type == "regression" and dm.num_outputs == 1
    assert {s: len(getattr(dm, f"{s}_set")) for s in SIZES} == SIZES
    text, audio, y = dm.train_set.inputs["text"], dm.train_set.inputs["audio"], dm.train_set.target
    assert text.shape == (24, 2, 50) and text.dtype == torch.long
    assert audio.shape == (24, 50, 5) and audio.dtype == torch.float32
    assert y.shape == (24, 1) and y.dtype == torch.float32
    ids, mask = text[:, 0], text[:, 1]
    assert torch.equal(mask, (ids != PAD_ID).long())  # padding exactly where the mask is 0, after the words
    assert torch.all(mask[:, :-1] >= mask[:, 1:])
    texts, labels = cmbert.read_tsv(tmp_path / "text" / "train.tsv")
    assert torch.equal(y.flatten(), torch.from_numpy(labels))
    assert mask.sum(1).tolist() == [len(t.split()) for t in texts]
    with open(tmp_path / cmbert.AUDIO_FILE, "rb") as f:
        assert np.allclose(audio.numpy(), pickle.load(f)[0])
    assert dm.encoder_args == {"text": {"vocab_size": dm.vocab.size, "pad_id": 0}}
    info = dm.describe()["mosi_cmbert"]
    assert info["vocab_size"] == dm.vocab.size and info["oov_rate"]["train"] == 0.0
    assert info["label_signs"]["train"]["zero"] >= 3  # the fixture's exact zeros
    batch = next(iter(dm.train_dataloader()))
    assert batch["inputs"]["text"].shape == (24, 2, 50) and batch["target"].shape == (24, 1)


def test_word_vocab_is_built_from_the_training_split_only(tmp_path):
    write_texts(
        tmp_path,
        {
            "train": [("GOOD MOVIE", 1.0), ("GOOD FILM ", -1.0), ("IT'S GOOD", 0.0)],
            "val": [("GOOD FILM", 0.5)],
            "test": [("GOOD ZEBRA MOVIE", -0.5)],
        },
    )
    dm = cmbert_module(tmp_path, modalities=["text"], num_samples=None)
    # good 3, then film / it's / movie once each, ties alphabetical; 0 pad, 1 unknown
    assert dm.vocab.itos == ["<pad>", "<unk>", "good", "film", "it's", "movie"]
    assert dm.test_set.inputs["text"][0, :, :4].tolist() == [[2, UNK_ID, 5, 0], [1, 1, 1, 0]]
    assert dm.train_set.inputs["text"][2, 0, :3].tolist() == [4, 2, 0]
    assert dm.encoder_args["text"]["vocab_size"] == 6
    assert dm.describe()["mosi_cmbert"]["oov_rate"] == {
        "train": 0.0,
        "val": 0.0,
        "test": pytest.approx(1 / 3),
    }
    rare = WordVocab(["good movie", "good film", "good"], min_freq=2)
    assert rare.itos == ["<pad>", "<unk>", "good"] and rare.ids("movie good") == [UNK_ID, 2]


def test_word_encoding_keeps_the_first_words_and_counts_truncation(tmp_path):
    vocab = WordVocab(["a b c d e"])
    x = vocab.encode(["a b c d e", "", "e"], max_len=3)
    assert x[0].tolist() == [[vocab.stoi["a"], vocab.stoi["b"], vocab.stoi["c"]], [1, 1, 1]]
    assert x[1].tolist() == [[UNK_ID, 0, 0], [1, 0, 0]]  # no word: one unknown token, never an empty mask
    assert x[2].tolist() == [[vocab.stoi["e"], 0, 0], [1, 0, 0]]
    write_texts(
        tmp_path, {"train": [("A B C D", 1.0), ("A", 0.0)], "val": [("A B", 0.0)], "test": [("B", 0.0)]}
    )
    dm = cmbert_module(tmp_path, modalities=["text"], num_samples=None, max_seq_len=3)
    assert dm.train_set.inputs["text"].shape == (2, 2, 3)
    assert dm.describe()["mosi_cmbert"]["truncated"] == {"train": 1, "val": 0, "test": 0}


def test_labels_are_parsed_as_scores_with_their_signs(tmp_path):
    rows = [("GOOD", 2.2), ("BAD", -1.2), ("OKAY", 0.0), ("FINE", -0.0), ("BEST", 3.0)]
    write_texts(tmp_path, {"train": rows, "val": rows[:2], "test": rows[2:]})
    dm = cmbert_module(tmp_path, modalities=["text"], num_samples=None)
    assert dm.train_set.target.flatten().tolist() == pytest.approx([2.2, -1.2, 0.0, 0.0, 3.0])
    signs = dm.describe()["mosi_cmbert"]["label_signs"]
    assert signs["train"] == {"pos": 2, "neg": 1, "zero": 2} and signs["test"] == {
        "pos": 1,
        "neg": 0,
        "zero": 2,
    }


def test_text_only_needs_no_audio_file(tmp_path):
    cmbert.write_fixture(tmp_path, audio=False)
    dm = CMBERTMOSIDataModule(data_dir=tmp_path, modalities=["text"], num_samples=SIZES)
    assert cmbert.AUDIO_FILE not in dm.required_files()
    dm.setup()
    assert list(dm.train_set.inputs) == ["text"] and dm.input_dims == {"text": 100}
    with pytest.raises(DatasetError, match=r"MOSI_cmu_audio_CLS\.pickle.*thuiar/Cross-Modal-BERT"):
        CMBERTMOSIDataModule(data_dir=tmp_path).prepare_data()


def test_a_missing_tsv_names_the_file_and_its_source(tmp_path):
    with pytest.raises(
        DatasetError, match=r"3 file\(s\) missing.*text/dev\.tsv.*github\.com/thuiar/Cross-Modal-BERT"
    ):
        CMBERTMOSIDataModule(data_dir=tmp_path, modalities=["text"]).prepare_data()


@pytest.mark.parametrize(
    "content, message",
    [
        ("sentence\tscore\nGOOD\t1.0\n", r"train\.tsv, line 1: header is 'sentence\\tscore', expected"),
        ("", r"train\.tsv, line 1: header is an empty file"),
        ("text\tlabel\nGOOD\t1.0\nBAD\tnegative\n", r"train\.tsv, line 3: label 'negative' is not a number"),
        ("text\tlabel\nGOOD\t1.0\nBAD\t-3.5\n", r"train\.tsv, line 3: label '-3.5' is outside .*\[-3, 3\]"),
        (
            "text\tlabel\nGOOD\t1.0\nBAD\t1.0\textra\n",
            r"train\.tsv, line 3: 3 tab-separated field\(s\), expected 2",
        ),
        ("text\tlabel\nGOOD\t1.0\n\nBAD\t1.0\n", r"train\.tsv, line 3: 1 tab-separated field"),
    ],
)
def test_malformed_tsv_lines_are_named(tmp_path, content, message):
    cmbert.write_fixture(tmp_path, audio=False)
    (tmp_path / "text" / "train.tsv").write_text(content)
    with pytest.raises(DatasetError, match=message):
        cmbert_module(tmp_path, modalities=["text"], num_samples=None)


def test_audio_that_does_not_match_the_tsvs_is_explained(tmp_path):
    cmbert.write_fixture(tmp_path)
    path = tmp_path / cmbert.AUDIO_FILE
    with open(path, "rb") as f:
        train, val, test = pickle.load(f)
    with open(path, "wb") as f:
        pickle.dump((train, val[:-1], test), f)
    with pytest.raises(
        DatasetError, match=r"\[1\] \(val, dev\.tsv\) has shape \(7, 50, 5\), expected \(8, 50, 5\)"
    ):
        cmbert_module(tmp_path)
    with open(path, "wb") as f:
        pickle.dump((train, val), f)
    with pytest.raises(DatasetError, match=r"holds a 2-tuple; expected CM-BERT's tuple \(train_audio"):
        cmbert_module(tmp_path)
    with pytest.raises(
        DatasetError, match=r"has shape \(24, 50, 5\), expected \(24, 40, 5\).*max_seq_len=40"
    ):
        cmbert.write_fixture(tmp_path)
        cmbert_module(tmp_path, max_seq_len=40)
    train[3, 2, 1] = np.nan
    with open(path, "wb") as f:
        pickle.dump((train, val, test), f)
    with pytest.raises(
        DatasetError, match=r"1 NaN/inf value\(s\) in 1 sample\(s\), first samples \[3\].*nonfinite=zero"
    ):
        cmbert_module(tmp_path)
    assert cmbert_module(tmp_path, nonfinite="zero").train_set.inputs["audio"][3, 2, 1] == 0.0


def test_row_counts_are_checked_against_num_samples(tmp_path):
    cmbert.write_fixture(tmp_path, audio=False)
    with pytest.raises(
        DatasetError, match=r"train\.tsv has 24 rows, expected 1284 \(dataset\.num_samples\.train\)"
    ):
        cmbert_module(tmp_path, modalities=["text"], num_samples=cmbert.SIZES)


@pytest.mark.skipif(not REAL_TSVS.is_dir(), reason="CM-BERT's real transcripts are not in ../shared")
def test_the_real_cmbert_transcripts_load_with_a_word_vocabulary(tmp_path):
    (tmp_path / "mosi_cmbert" / "text").mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv", "test.tsv"):
        shutil.copy(REAL_TSVS / name, tmp_path / "mosi_cmbert" / "text" / name)
    dm = instantiate(
        compose_cfg(["dataset=mosi_words", f"paths.data_dir={tmp_path}"]).dataset, _convert_="all"
    )
    assert dm.tokenizer == "words" and dm.modalities == ["text"] and dm.num_samples == cmbert.SIZES
    dm.setup()  # the config's git blob ids of CM-BERT's tsvs are verified first
    assert {s: len(getattr(dm, f"{s}_set")) for s in SIZES} == {"train": 1284, "val": 229, "test": 686}
    info = dm.describe()["mosi_cmbert"]
    assert info["label_signs"]["train"] == {"pos": 679, "neg": 552, "zero": 53}
    assert info["label_signs"]["val"] == {"pos": 124, "neg": 92, "zero": 13}
    assert info["oov_rate"]["train"] == 0.0 and 0.0 < info["oov_rate"]["test"] < 0.2
    assert info["empty_texts"] == {"train": 0, "val": 0, "test": 0}
    assert dm.train_set.inputs["text"][:, 1].sum(1).min() >= 1


@pytest.mark.parametrize(
    "dataset, target, values",
    [
        ("mosi_cmbert", CMBERTMOSIDataModule, {"batch_size": 24, "modalities": ["audio", "text"]}),
        (
            "mosi_words",
            CMBERTMOSIDataModule,
            {"batch_size": 32, "modalities": ["text"], "tokenizer": "words"},
        ),
        ("mosi_mag", MAGDataModule, {"batch_size": 48, "feature_dims": {"audio": 74, "vision": 47}}),
        ("mosei_mag", MAGDataModule, {"batch_size": 48, "feature_dims": {"audio": 74, "vision": 35}}),
    ],
)
def test_the_dataset_configs_build_their_datamodules(dataset, target, values):
    # backbone=mosi_mag: a backbone with text.pretrained, which the pretrained-tokenizer configs read
    dm = instantiate(compose_cfg([f"dataset={dataset}", "backbone=mosi_mag"]).dataset, _convert_="all")
    assert type(dm) is target and dm.name == dataset and dm.max_seq_len == 50
    assert dm.regression_loss == "mse" and dm.monitor == {"metric": "val/loss", "mode": "min"}
    assert "acc2_all_gt0" in dm.extra_metrics and "acc2_non0" in dm.extra_metrics
    assert {k: getattr(dm, k) for k in values} == values
    if dataset != "mosi_words":
        assert dm.tokenizer.endswith("bert-base-uncased")


# -- pretrained tokenizers -------------------------------------------------------------------------
def test_load_tokenizer_says_what_to_put_in_a_missing_or_empty_folder(tmp_path):
    for folder, what in ((tmp_path / "nope", "does not exist"), (tmp_path, "is empty")):
        with pytest.raises(
            DatasetError, match=rf"{what}.*save_pretrained\(DIR\).*`dataset\.tokenizer`.*never downloads"
        ):
            load_tokenizer(folder)
    (tmp_path / "junk.txt").write_text("not a tokenizer")
    with pytest.raises(DatasetError, match=r"cannot be read by transformers' AutoTokenizer.*save_pretrained"):
        load_tokenizer(tmp_path)
    cmbert.write_fixture(tmp_path / "data", audio=False)
    with pytest.raises(DatasetError, match=r"does not exist.*tokenizer\.save_pretrained"):
        CMBERTMOSIDataModule(
            data_dir=tmp_path / "data", tokenizer=str(tmp_path / "bert"), modalities=["text"]
        ).setup()
    with pytest.raises(DatasetError, match=r"dataset\.tokenizer is empty.*`words`"):
        CMBERTMOSIDataModule(data_dir=tmp_path / "data", tokenizer=None, modalities=["text"]).setup()


def test_cmbert_with_a_pretrained_tokenizer_frames_pieces_like_cm_bert(tmp_path, tiny_bert):
    cmbert.write_fixture(tmp_path)
    dm = cmbert_module(tmp_path, tokenizer=str(tiny_bert))
    tok = load_tokenizer(tiny_bert)
    texts, _ = cmbert.read_tsv(tmp_path / "text" / "test.tsv")
    x = dm.test_set.inputs["text"]
    assert x.shape == (8, 2, 50) and dm.encoder_args == {}
    for row, text in zip(x, texts):
        pieces = tok.tokenize(text)  # upper-case transcripts, lower-cased by the uncased tokenizer
        n = len(pieces) + 2
        want = tok.convert_tokens_to_ids(["[CLS]", *pieces, "[SEP]"]) + [0] * (50 - n)
        assert row[0].tolist() == want and row[1].tolist() == [1] * n + [0] * (50 - n)
    assert dm.describe()["mosi_cmbert"]["oov_rate"]["test"] == 0.0
    short = encode_with_tokenizer(["good movie and great music"], tok, 4)  # pieces cut to max_len - 2
    assert short[0].tolist() == [tok.convert_tokens_to_ids(["[CLS]", "good", "movie", "[SEP]"]), [1, 1, 1, 1]]


def test_encoding_respects_the_tokenizers_padding_side(tiny_xlnet_tokenizer):
    tok = tiny_xlnet_tokenizer
    x = encode_with_tokenizer(["the good movie"], tok, 6)
    assert x[0].tolist() == [
        [tok.pad_token_id, *tok.convert_tokens_to_ids(["▁the", "▁good", "▁movie", "<sep>", "<cls>"])],
        [0, 1, 1, 1, 1, 1],
    ]


# -- MAG alignment ---------------------------------------------------------------------------------
def test_mag_alignment_repeats_rows_per_piece_with_zeros_at_bert_specials(tiny_bert):
    tok = load_tokenizer(tiny_bert)
    words = ["the", "goodx", "movie"]
    assert tok.tokenize("goodx") == ["good", "##x"]  # one word, two pieces
    rows = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]], dtype=np.float32)
    tokens, feats = align_word_features(words, rows, tok, 8)
    pieces = ["[CLS]", "the", "good", "##x", "movie", "[SEP]"]
    assert tokens.tolist() == [tok.convert_tokens_to_ids(pieces) + [0, 0], [1] * 6 + [0, 0]]
    want = [[0, 0], [1, 10], [2, 20], [2, 20], [3, 30], [0, 0], [0, 0], [0, 0]]
    assert feats.tolist() == want and feats.dtype == torch.float32
    # MAG cuts the pieces to max_seq_len - 2 before adding [CLS] / [SEP]
    tokens, feats = align_word_features(words, rows, tok, 4)
    assert tokens[0].tolist() == tok.convert_tokens_to_ids(["[CLS]", "the", "good", "[SEP]"])
    assert feats.tolist() == [[0, 0], [1, 10], [2, 20], [0, 0]]


def test_mag_alignment_puts_xlnet_specials_last_and_pads_left(tiny_xlnet_tokenizer):
    tok = tiny_xlnet_tokenizer
    words = ["the", "goods", "movie"]
    assert tok.tokenize("goods") == ["▁good", "s"]
    rows = np.array([[1.0], [2.0], [3.0]], dtype=np.float32)
    tokens, feats = align_word_features(words, rows, tok, 8)
    # MAG's prepare_xlnet_input: pad.. pieces <sep> <cls>, zero rows at the pads and both specials
    pieces = ["▁the", "▁good", "s", "▁movie", "<sep>", "<cls>"]
    assert tokens.tolist() == [[tok.pad_token_id] * 2 + tok.convert_tokens_to_ids(pieces), [0, 0] + [1] * 6]
    assert feats.flatten().tolist() == [0, 0, 1, 2, 2, 3, 0, 0]


def test_mag_fixture_loads_aligned_features_for_every_modality(tmp_path, tiny_bert):
    mag_data.write_fixture(tmp_path, file="mosi.pkl", seed=1)
    dm = MAGDataModule(tokenizer=str(tiny_bert), data_dir=tmp_path, num_samples=SIZES, max_seq_len=16)
    dm.setup()
    assert dm.modalities == ["audio", "text", "vision"] and dm.monitor == {
        "metric": "val/loss",
        "mode": "min",
    }
    x = dm.train_set.inputs
    assert x["text"].shape == (24, 2, 16) and x["text"].dtype == torch.long
    assert x["audio"].shape == (24, 16, 74) and x["vision"].shape == (24, 16, 47)
    with open(tmp_path / "mosi.pkl", "rb") as f:
        raw = pickle.load(f)
    tok = load_tokenizer(tiny_bert)
    for i in (0, 5):
        (words, visual, acoustic), label, _ = raw["train"][i]
        tokens, feats = align_word_features(words, np.concatenate([acoustic, visual], 1), tok, 16)
        assert torch.equal(x["text"][i], tokens)
        assert torch.equal(x["audio"][i], feats[:, :74]) and torch.equal(x["vision"][i], feats[:, 74:])
        assert dm.train_set.target[i, 0] == pytest.approx(float(label[0, 0]))
    mask = x["text"][:, 1].bool()
    assert not x["audio"][~mask].any() and not x["audio"][:, 0].any()  # padding and [CLS] rows are zero
    info = dm.describe()["mag"]
    assert info["sizes"] == SIZES and info["label_signs"]["train"]["zero"] >= 8
    assert info["truncated"]["train"] == sum(
        len(tok(s[0][0], is_split_into_words=True)["input_ids"]) > 16 for s in raw["train"]
    )


def test_mag_reads_misa_style_four_tuples_and_mosei_widths(tmp_path, tiny_bert):
    dims = {"audio": 74, "vision": 35}
    data = mag_data.make_fixture(feature_dims=dims)
    misa = {
        k: [((np.arange(len(w)), v, a, list(w)), y, seg) for (w, v, a), y, seg in samples]
        for k, samples in data.items()
    }
    mag_data.write_fixture(tmp_path / "mag", file="mosei.pkl", data=data)
    mag_data.write_fixture(tmp_path / "misa", file="mosei.pkl", data=misa)
    kwargs = dict(tokenizer=str(tiny_bert), file="mosei.pkl", feature_dims=dims, max_seq_len=12)
    a = MAGDataModule(data_dir=tmp_path / "mag", **kwargs)
    b = MAGDataModule(data_dir=tmp_path / "misa", modalities=["text", "vision"], **kwargs)
    a.setup()
    b.setup()
    assert b.train_set.inputs["vision"].shape == (24, 12, 35) and sorted(b.train_set.inputs) == [
        "text",
        "vision",
    ]
    for m in ("text", "vision"):
        assert torch.equal(a.test_set.inputs[m], b.test_set.inputs[m])


def test_mag_errors_name_the_file_the_source_and_the_fix(tmp_path, tiny_bert):
    tok = str(tiny_bert)
    with pytest.raises(DatasetError, match=r"mosi\.pkl.*WasifurRahman/BERT_multimodal_transformer"):
        MAGDataModule(tokenizer=tok, data_dir=tmp_path).prepare_data()
    mag_data.write_fixture(tmp_path, seed=2)
    with pytest.raises(
        DatasetError, match=r"\['train'\]\[0\] \(visual\) has shape \(\d+, 47\), expected \(\d+, 35\).*MOSEI"
    ):
        MAGDataModule(tokenizer=tok, data_dir=tmp_path, feature_dims={"audio": 74, "vision": 35}).setup()
    with pytest.raises(
        DatasetError, match=r"\['dev'\] has 8 samples, expected 229 \(dataset\.num_samples\.val\)"
    ):
        MAGDataModule(
            tokenizer=tok, data_dir=tmp_path, num_samples={"train": 24, "val": 229, "test": 8}
        ).setup()
    with pytest.raises(DatasetError, match=r"Tokenizer folder .*missing.* does not exist.*save_pretrained"):
        MAGDataModule(tokenizer=str(tmp_path / "missing"), data_dir=tmp_path).setup()
    with pytest.raises(DatasetError, match=r"No tokenizer folder given"):
        MAGDataModule(tokenizer=None, data_dir=tmp_path).setup()
    data = mag_data.make_fixture()
    data["train"][3][0][2][0, 5] = np.inf
    mag_data.write_fixture(tmp_path, data=data)
    with pytest.raises(
        DatasetError, match=r"\['train'\] audio features have 1 NaN/inf value\(s\).*\[3\].*nonfinite=zero"
    ):
        MAGDataModule(tokenizer=tok, data_dir=tmp_path).setup()
    data["valid"] = data.pop("dev")
    mag_data.write_fixture(tmp_path, data=data)
    with pytest.raises(DatasetError, match=r"no split\(s\) \['dev'\].*'train', 'dev', 'test'"):
        MAGDataModule(tokenizer=tok, data_dir=tmp_path).setup()
