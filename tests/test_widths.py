"""Fusions that need equal encoder widths (DEQ, sum, weighted sum) name the backbone key that sets each
encoder's width, whatever the encoder (issue 15: `fusion=deq dataset=mosei` used to advise `hidden_dims`, a
key MOSEI's Transformer encoders do not have)."""

from __future__ import annotations

import inspect

import pytest
from conftest import FAST
from hydra.utils import get_class
from omegaconf import OmegaConf

from fusionbench import ROOT
from fusionbench.encoders.context import ContextEncoder
from fusionbench.train import explain, train

BACKBONES = sorted((ROOT / "configs" / "backbone").glob("*.yaml"))


@pytest.mark.parametrize("path", BACKBONES, ids=[p.stem for p in BACKBONES])
def test_every_backbone_encoder_names_a_width_key_it_accepts(path):
    node = OmegaConf.load(path)
    for name, enc in node.items():
        if name == "defaults" or not OmegaConf.is_dict(enc) or "_target_" not in enc:
            continue
        cls = get_class(enc._target_)
        if issubclass(cls, ContextEncoder) and cls.width_key is not None:
            assert cls.width_key in inspect.signature(cls.__init__).parameters, (path.name, name)


def test_deq_on_mosei_names_the_transformer_width_key(make_cfg, tmp_path):
    from fusionbench.data.mosei import write_fixture

    write_fixture(tmp_path / "mosei")
    sizes = "dataset.num_samples={train: 24, val: 8, test: 8}"  # the fixture's
    cfg = make_cfg(["dataset=mosei", f"paths.data_dir={tmp_path}", sizes, "fusion=deq", *FAST])
    with pytest.raises(Exception) as caught:  # noqa: PT011 - the message is what is checked
        train(cfg)
    message = explain(caught.value) or ""
    assert "`backbone.vision.dim`=60" in message and "`backbone.text.dim`=120" in message
    assert "hidden_dims`=" not in message


def test_sum_on_mlp_encoders_names_hidden_dims(make_cfg):
    cfg = make_cfg(["dataset=synthetic", "fusion=sum", *FAST])
    first = sorted(cfg.backbone)[0]
    cfg.backbone[first].hidden_dims = [8]
    with pytest.raises(Exception) as caught:  # noqa: PT011
        train(cfg)
    assert f"`backbone.{first}.hidden_dims`=8" in (explain(caught.value) or "")
