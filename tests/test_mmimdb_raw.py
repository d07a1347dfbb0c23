"""Raw MM-IMDB (posters + plots, `fusionbench.data.mmimdb_raw`) and the torchvision image backbones
(`fusionbench.encoders.image`), on a fixture in the archive's layout with tiny saved models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import FAST

from fusionbench.data.mmimdb import GENRES
from fusionbench.data.mmimdb_raw import MMIMDBRawDataModule, write_fixture
from fusionbench.data.text import FIXTURE_WORDS, load_tokenizer
from fusionbench.encoders.image import PretrainedImageEncoder
from fusionbench.errors import ConfigError, DatasetError

SIZES = {"train": 6, "val": 2, "test": 2}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from fusionbench.encoders.pretrained import save_tiny_pretrained

    return save_tiny_pretrained(tmp_path_factory.mktemp("tiny") / "bert", words=FIXTURE_WORDS)


@pytest.fixture
def raw(tmp_path) -> Path:
    return write_fixture(tmp_path / "mmimdb_raw", SIZES, seed=1)


def make_dm(folder: Path, tiny: Path, **over) -> MMIMDBRawDataModule:
    kw = dict(data_dir=folder, tokenizer=str(tiny), max_len=24, image_size=32, resize=36, num_samples=SIZES)
    kw.update(over)
    return MMIMDBRawDataModule(**kw)


def movie(folder: Path, split: str, i: int) -> tuple[str, dict]:
    ids = json.loads((folder / "mmimdb" / "split.json").read_text())[split]
    return ids[i], json.loads((folder / "mmimdb" / "dataset" / f"{ids[i]}.json").read_text())


def test_batches_have_the_contract_shapes_and_the_json_genres(raw, tiny):
    dm = make_dm(raw, tiny, batch_size=4)
    dm.setup()
    assert dm.task_type == "multilabel" and dm.num_outputs == 23 and dm.modalities == ["image", "text"]
    assert dm.input_dims == {"image": 3 * 32 * 32, "text": 2 * 24}
    assert dm.monitor == {"metric": "val/f1_macro", "mode": "max"}
    assert [len(dm.train_set), len(dm.val_set), len(dm.test_set)] == [6, 2, 2]
    batch = next(iter(dm.val_dataloader()))
    assert (
        batch["inputs"]["image"].shape == (2, 3, 32, 32) and batch["inputs"]["image"].dtype == torch.float32
    )
    assert batch["inputs"]["text"].shape == (2, 2, 24) and batch["inputs"]["text"].dtype == torch.long
    for i in range(2):  # dev = our val, in split.json's order; labels by hand from the json
        _, meta = movie(raw, "dev", i)
        want = torch.tensor([1.0 if g in meta["genres"] else 0.0 for g in GENRES])
        assert torch.equal(batch["target"][i], want)


def test_genres_outside_the_23_are_ignored(raw, tiny):
    dm = make_dm(raw, tiny)
    dm.setup()
    mid, meta = movie(raw, "train", 0)
    meta["genres"] = ["News", "Comedy", "Reality-TV", "Film-Noir", "Adult", "Talk-Show"]
    (raw / "mmimdb" / "dataset" / f"{mid}.json").write_text(json.dumps(meta))
    y = dm.train_set[0]["target"]
    assert y.shape == (23,) and y.sum() == 2
    assert y[GENRES.index("Comedy")] == 1 and y[GENRES.index("Film-Noir")] == 1


def test_the_longest_plot_is_tokenised(raw, tiny):
    dm = make_dm(raw, tiny)
    dm.setup()
    mid, meta = movie(raw, "train", 1)
    meta["plot"] = ["short plot.", "the longest plot of this movie was very good", "a middle plot here"]
    (raw / "mmimdb" / "dataset" / f"{mid}.json").write_text(json.dumps(meta))
    tok = load_tokenizer(tiny)
    x = dm.train_set[1]["inputs"]["text"]
    ids = tok("the longest plot of this movie was very good")["input_ids"]
    assert x[0, : len(ids)].tolist() == ids and x[1].sum() == len(ids) and x[0, len(ids) :].eq(0).all()
    assert x[0, 0] == tok.cls_token_id


def test_loading_is_lazy(raw, tiny):
    """setup reads only split.json; a poster changed afterwards is what the item returns."""
    from PIL import Image

    dm = make_dm(raw, tiny)
    dm.setup()
    assert not hasattr(dm.train_set, "images")
    mid, _ = movie(raw, "test", 0)
    Image.new("RGB", (40, 40), (255, 255, 255)).save(raw / "mmimdb" / "dataset" / f"{mid}.jpeg")
    img = dm.test_set[0]["inputs"]["image"]
    want = (1.0 - torch.tensor(dm.mean)) / torch.tensor(dm.std)
    assert torch.allclose(img, want.view(3, 1, 1).expand_as(img), atol=0.02)


def test_image_only_needs_no_tokenizer(raw):
    dm = MMIMDBRawDataModule(data_dir=raw, modalities=["image"], image_size=16, resize=20)
    dm.setup()
    assert set(dm.train_set[0]["inputs"]) == {"image"}


def test_missing_split_json_names_it_and_the_archive(tmp_path, tiny):
    with pytest.raises(DatasetError, match=r"mmimdb/split.json.*mmimdb.tar.gz.*archive.org item 'mmimdb'"):
        make_dm(tmp_path, tiny).prepare_data()


def test_missing_poster_is_named(raw, tiny):
    mid, _ = movie(raw, "dev", 1)
    (raw / "mmimdb" / "dataset" / f"{mid}.jpeg").unlink()
    with pytest.raises(DatasetError, match=rf"1 file\(s\) missing.*mmimdb/dataset/{mid}.jpeg.*mmimdb.tar.gz"):
        make_dm(raw, tiny).setup()
    make_dm(raw, tiny, modalities=["text"]).setup()  # text only needs no poster


def test_split_sizes_are_checked(raw, tiny):
    with pytest.raises(DatasetError, match=r"15552 / 2608 / 7799"):
        make_dm(raw, tiny, num_samples={"train": 15552, "val": 2608, "test": 7799}).setup()


# -- image encoder -----------------------------------------------------------------------------------------
def test_resnet18_random_init_shapes_context_and_gradients():
    enc = PretrainedImageEncoder("resnet18", random_init=True, proj_dim=8)
    x = torch.randn(2, 3, 32, 32)
    assert enc.output_dim == 8 and enc(x).shape == (2, 8)
    enc.eval()
    enc.attach_context(5)
    c = torch.randn(2, 5)
    with torch.no_grad():
        assert torch.equal(enc(x), enc(x, torch.zeros(2, 5)))  # zero context = the base encoder
        pooled = enc.body(x)
        assert torch.allclose(enc(x, c), enc.proj(pooled + enc.context_join.proj(c)), atol=1e-6)
    enc(x, c).sum().backward()
    assert enc.context_join.proj.weight.grad is not None and enc.body[0].weight.grad is not None


def test_freezing_keeps_pretrained_batchnorm_statistics():
    enc = PretrainedImageEncoder("resnet18", random_init=True, freeze="features")
    trainable = {n.split(".")[1] for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == {"7"}  # body[7] = layer4
    enc.train()
    bn = enc.body[1]
    before = bn.running_mean.clone()
    enc(torch.randn(2, 3, 32, 32))
    assert not bn.training and torch.equal(bn.running_mean, before)
    assert enc.body[7][0].bn1.training
    full = PretrainedImageEncoder("resnet18", random_init=True, freeze="all")
    assert not any(p.requires_grad for p in full.parameters())


def test_weights_load_from_a_local_state_dict(tmp_path):
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    torch.save(model.state_dict(), tmp_path / "resnet18.pth")
    enc = PretrainedImageEncoder("resnet18", weights=str(tmp_path / "resnet18.pth"))
    assert torch.equal(enc.body[0].weight, model.conv1.weight) and enc.output_dim == 512
    model.eval(), enc.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(
            enc(x), torch.flatten(model.avgpool(torch.nn.Sequential(*list(model.children())[:-2])(x)), 1)
        )
    with pytest.raises(ConfigError, match=r"does not fit torchvision's resnet34"):
        PretrainedImageEncoder("resnet34", weights=str(tmp_path / "resnet18.pth"))


def test_missing_weights_file_says_how_to_save_it(tmp_path):
    path = tmp_path / "vgg16.pth"
    with pytest.raises(
        ConfigError, match=r"vgg16.pth does not exist.*torchvision.models.vgg16\(weights=.*state_dict\(\)"
    ):
        PretrainedImageEncoder("vgg16", weights=str(path))
    with pytest.raises(ConfigError, match=r"weights is empty.*random_init=true"):
        PretrainedImageEncoder("resnet18", weights=None)
    with pytest.raises(ConfigError, match=r"arch='alexnet' is not one of"):
        PretrainedImageEncoder("alexnet", random_init=True)


def test_vgg16_gives_fc7():
    enc = PretrainedImageEncoder("vgg16", random_init=True).eval()
    assert enc.output_dim == 4096 and len(enc.body) == 3 + 5  # features, avgpool, flatten, fc6 .. fc7 ReLU
    with torch.no_grad():
        out = enc(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 4096) and (out >= 0).all()  # after fc7's ReLU


# -- end to end ---------------------------------------------------------------------------------------------
def test_one_batch_runs_end_to_end_with_hydra(make_cfg, tmp_path, tiny):
    from fusionbench.train import train

    write_fixture(tmp_path / "mmimdb_raw", SIZES)
    cfg = make_cfg(
        [
            "dataset=mmimdb_raw",
            "fusion=concat",
            f"paths.data_dir={tmp_path}",
            f"backbone.text.pretrained={tiny}",
            "backbone.image.arch=resnet18",
            "backbone.image.random_init=true",
            "backbone.image.weights=null",
            "dataset.num_samples={train: 6, val: 2, test: 2}",
            "dataset.max_len=32",
            "dataset.image_size=32",
            "dataset.resize=36",
            "dataset.num_workers=0",
            "dataset.batch_size=2",
            "debug=fdr",
            *FAST,
        ]
    )
    assert cfg.dataset.tokenizer == str(tiny) and cfg.backbone.text.pool == "pooler"
    record, objs = train(cfg)
    assert objs["trainer"].global_step == 1
    assert math.isfinite(record["metrics"]["test/f1_macro"])
    assert objs["task"].model.encoders["image"].output_dim == 768  # projected to BERT's width (proj_dim)
