"""`scripts/stock_baselines.py`: the reference predictors checked by hand on tiny price files, and the
scale check of a trained run against the trainer's own test MSE."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST
from test_stocks import module, write_prices

from fusionbench import ROOT
from fusionbench.train import train

sys.path.insert(0, str(ROOT / "scripts"))
try:
    import stock_baselines
finally:
    sys.path.pop(0)


def test_reference_predictors_by_hand(tmp_path):
    folder = tmp_path / "stocks"
    opens = write_prices(folder, n_days=30)
    dm = module(folder)  # window 5, 8 train and 3 val windows, the rest test
    r = np.log(opens["BBB"][1:] / opens["BBB"][:-1])
    y = r[5:] ** 2 / dm.info["target_std"]  # target of window k: the squared return after it
    test = np.arange(11, len(y))
    refs = stock_baselines.references(dm, [2])
    expected = {
        "constant (training mean)": np.full(len(test), y[:8].mean()),
        "copy-last": y[test - 1],  # the squared return of the window's last day
        "2-day mean": (y[test - 1] + y[test - 2]) / 2,
    }
    assert list(refs) == list(expected)
    for name, pred in expected.items():
        mse, r_ = refs[name]
        assert mse == pytest.approx(((pred - y[test]) ** 2).mean(), rel=1e-5), name
        if name.startswith("constant"):
            assert np.isnan(r_)  # a constant has no correlation
        else:
            assert r_ == pytest.approx(np.corrcoef(pred, y[test])[0, 1], rel=1e-5), name


def test_a_mean_longer_than_the_history_is_refused(tmp_path):
    folder = tmp_path / "stocks"
    write_prices(folder, n_days=30)
    dm = module(folder)  # the first test window starts at day 11
    assert len(stock_baselines.references(dm, [11])) == 3
    with pytest.raises(ValueError, match=r"a 12-day mean needs 12 earlier days.*only 11.*--days"):
        stock_baselines.references(dm, [12])


def test_scale_check_of_a_trained_run(make_cfg):
    cfg = make_cfg(
        [
            *FAST,
            "dataset=stocks",
            "fusion=early_sequence",
            "trainer.max_epochs=1",
            "dataset.window=8",
            "dataset.num_train=64",
            "dataset.num_val=16",
            "dataset.start_date=2010-01-04",
            "dataset.end_date=2010-08-31",
        ]
    )
    result, _ = train(cfg)
    run = Path(cfg.paths.output_dir)
    same = stock_baselines.scale_check(run, 1.0)
    assert same["moved"] == 0.0  # scaling by 1 changes nothing
    assert same["mse"] == pytest.approx(result["metrics"]["test/mse"], rel=1e-4)  # the checkpoint tested
    doubled = stock_baselines.scale_check(run, 2.0)
    assert doubled["mse"] == same["mse"] and doubled["moved"] > 0  # an LSTM sees the scale of its inputs
    init = stock_baselines.scale_check(run, 2.0, init=True)
    assert init["mse"] != same["mse"]  # the untrained model, not the checkpoint


def test_a_path_that_is_not_a_run_is_refused_up_front(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["stock_baselines.py", "--runs", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match=r"nowhere is not a run folder \(no .hydra/config.yaml\)"):
        stock_baselines.main()
    assert capsys.readouterr().out == ""  # nothing computed before the refusal


def test_the_report_names_every_option_that_changes_it():
    """The report's header is its reproduction command, so a subset of sectors or another scale must show."""
    parse = stock_baselines.argparse.Namespace
    defaults = dict(sectors=list(stock_baselines.SECTORS), days=[5, 20, 100], scale=2.0, init=False, runs=[])
    assert stock_baselines.reproduce_command(parse(**defaults)) == "python scripts/stock_baselines.py"
    runs = [Path("a"), Path("b")]
    changed = dict(defaults, sectors=["F&B", "TECH"], days=[5], scale=3.0, init=True, runs=runs)
    assert stock_baselines.reproduce_command(parse(**changed)) == (
        "python scripts/stock_baselines.py --sectors 'F&B' TECH --days 5 --scale 3 --init --runs a b"
    )
