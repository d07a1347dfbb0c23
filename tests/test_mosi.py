"""`dataset=mosi`: CMU-MOSI from MultiBench's affect pickles (mosi_raw.pkl, and mosi_data.pkl with its own
feature widths), read by the MOSEI loader; fixtures in the pickle's real layout."""

from __future__ import annotations

import math

import pytest
from conftest import FAST

from fusionbench.data.mosei import make_fixture, write_fixture
from fusionbench.errors import DatasetError
from fusionbench.train import train

SIZES = "dataset.num_samples={train: 24, val: 8, test: 8}"  # the fixture's


def test_mosi_raw_trains_a_late_fusion_model_and_logs_every_sentiment_variant(make_cfg, tmp_path):
    write_fixture(tmp_path / "mosi", file="mosi_raw.pkl")
    cfg = make_cfg(["dataset=mosi", f"paths.data_dir={tmp_path}", SIZES, "fusion=concat", *FAST])
    assert cfg.dataset.num_samples and cfg.backbone.audio.in_features == 74
    record, objs = train(cfg)
    assert objs["datamodule"].name == "mosi" and record["data"]["sizes"] == {"train": 24, "val": 8, "test": 8}
    for key in ("test/mae", "test/acc2_non0", "test/acc2_all_gt0", "test/f1w_has0", "test/acc7", "test/acc5"):
        assert math.isfinite(record["metrics"][key]), key


def test_the_mult_aligned_mosi_pickle_sets_its_own_widths(make_cfg, tmp_path):
    dims = {"audio": 5, "text": 300, "vision": 20}
    data = make_fixture(feature_dims=dims)
    write_fixture(tmp_path / "mosi", file="mosi_data.pkl", data=data)
    cfg = make_cfg(
        [
            "dataset=mosi",
            f"paths.data_dir={tmp_path}",
            SIZES,
            "dataset.file=mosi_data.pkl",
            "dataset.feature_dims={audio: 5, text: 300, vision: 20}",
            "fusion=concat",
            *FAST,
        ]
    )
    assert cfg.backbone.vision.in_features == 20  # the backbone follows the dataset's widths
    record, _ = train(cfg)
    assert math.isfinite(record["metrics"]["test/mae"])


def test_a_missing_mosi_file_says_where_it_comes_from(make_cfg, tmp_path):
    cfg = make_cfg(["dataset=mosi", f"paths.data_dir={tmp_path}", *FAST])
    with pytest.raises(DatasetError, match=r"mosi_raw.pkl.*MultiBench"):
        train(cfg)
