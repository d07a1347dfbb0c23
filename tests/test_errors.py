"""Bad input found by trying fusionbench as a new user (issue 14): each ends in one paragraph that says
what is wrong and what to do, never a traceback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import FAST

from fusionbench.errors import DatasetError, FusionbenchError
from fusionbench.train import explain, train

SYN = ["dataset=synthetic", *FAST]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["fusion=deq", "fusion.mode=unrolled", "fusion.depth=-1"], r"depth >= 1, got .* -1"),
        (
            ["fusion=deq", "fusion.f_max_iter=abc"],
            r"fusion.f_max_iter='abc' must be int \(the `f_max_iter` argument",
        ),
        (["fusion=concat", "fusion.head_dropout=high"], r"fusion.head_dropout='high' must be float"),
        (["optimizer.lr=-1"], r"optimizer.lr=-1 must be a number > 0"),
        (["optimizer.weight_decay=-0.1"], r"optimizer.weight_decay=-0.1 must be a number >= 0"),
        (["seed=abc"], r"seed='abc' must be an integer"),
        (["dataset.batch_size=ten"], r"dataset.batch_size='ten' must be int"),
    ],
)
def test_bad_values_are_one_paragraph(make_cfg, overrides, message):
    """What `python train.py` prints (`explain`): a constructor's error reaches it wrapped by Hydra."""
    with pytest.raises(Exception) as caught:  # noqa: PT011 - the message is what is checked
        train(make_cfg([*SYN, *overrides]))
    assert re.search(message, explain(caught.value) or ""), explain(caught.value)


def test_an_unwritable_run_folder_is_one_paragraph(make_cfg):
    cfg = make_cfg(SYN)
    cfg.paths.output_dir = "/proc/fusionbench/run"  # cannot be created, even by root
    with pytest.raises(
        FusionbenchError, match=r"Cannot write the run folder /proc/fusionbench/run: .* writable"
    ):
        train(cfg)


def test_a_truncated_avmnist_array_is_a_dataset_error(make_cfg, tmp_path):
    from fusionbench.data import AVMNISTDataModule

    AVMNISTDataModule.write(tmp_path / "avmnist", n_train=20, n_test=10)
    sizes = ["dataset.num_train=10", "dataset.num_samples={train: 20, test: 10}"]
    array = tmp_path / "avmnist" / "image" / "train_data.npy"
    array.write_bytes(array.read_bytes()[:2000])  # a copy cut short
    cfg = make_cfg(["dataset=avmnist", f"paths.data_dir={tmp_path}", *FAST, *sizes])
    with pytest.raises(DatasetError, match=r"train_data.npy is not a readable .npy array"):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "metrics.json").exists()
