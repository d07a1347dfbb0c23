"""Stock series: windows, targets and normalisation checked by hand on tiny price files in Yahoo's
layout, MultiBench's construction transcribed for comparison, date intersection, quantisation, the
errors, and the shipped snapshot (sizes per sector, checksums)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import compose_cfg
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fusionbench import ROOT
from fusionbench.data import StocksDataModule
from fusionbench.data.base import sha256_file
from fusionbench.data.stocks import SECTORS, quantize
from fusionbench.errors import DatasetError
from fusionbench.train import build

SNAPSHOT = ROOT / "data" / "stocks"
TICKERS = ("AAA", "BBB", "CCC")
SMALL = {"window": 5, "num_train": 8, "num_val": 3}  # needs 5 + 8 + 3 + 2 = 18 common days


def business_days(n: int, start: str = "2001-01-02") -> list[str]:
    return [d.strftime("%Y-%m-%d") for d in pd.bdate_range(start, periods=n)]


def random_opens(n: int, seed: int) -> np.ndarray:
    """A positive random walk, rounded to the 6 decimals the files hold."""
    rng = np.random.default_rng(seed)
    return np.round(20.0 * np.exp(np.cumsum(rng.normal(0, 0.02, n))), 6)


def write_prices(folder: Path, n_days: int = 24, tickers=TICKERS, seed: int = 0) -> dict[str, np.ndarray]:
    dates = business_days(n_days)
    opens = {t: random_opens(n_days, seed + i) for i, t in enumerate(tickers)}
    for t, o in opens.items():
        StocksDataModule.write(folder / f"{t}.csv", dates, o)
    return opens


def module(folder: Path, **over) -> StocksDataModule:
    kw = dict(
        sector=None,
        tickers=list(TICKERS),
        target="BBB",
        data_dir=folder,
        quantize=False,
        batch_size=4,
        **SMALL,
    )
    kw.update(over)
    dm = StocksDataModule(**kw)
    dm.prepare_data()
    dm.setup()
    return dm


@pytest.fixture
def prices(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    folder = tmp_path / "stocks"
    return folder, write_prices(folder)


# -- file format -------------------------------------------------------------------------------


def test_fixture_writer_uses_the_real_file_layout(tmp_path):
    real = (SNAPSHOT / "MCD.csv").read_text()
    path = StocksDataModule.write(tmp_path / "X.csv", ["2001-01-02", "2001-01-03"], [1.5, 2.25])
    text = path.read_text()
    assert text.splitlines()[0] == real.splitlines()[0] == "Date,Open,High,Low,Close,Adj Close,Volume"
    assert not text.endswith("\n") and not real.endswith("\n")  # like the snapshot: no trailing newline
    row = text.splitlines()[1].split(",")
    assert row[0] == "2001-01-02" and row[1] == "1.500000" and row[-1].isdigit()
    assert [len(v.split(".")[1]) for v in real.splitlines()[1].split(",")[1:6]] == [6] * 5


# -- construction by hand ----------------------------------------------------------------------


def test_windows_targets_and_normalisation_by_hand(prices):
    folder, opens = prices
    dm = module(folder)
    # 24 days -> 23 returns -> 18 windows of 5: 8 train, 3 val, 7 test
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (8, 3, 7)
    r = {t: np.log(o[1:] / o[:-1]) for t, o in opens.items()}
    # one scalar over all tickers and the first window + num_train = 13 returns (unbiased std)
    first = np.concatenate([r[t][:13] for t in TICKERS])
    input_std = np.sqrt(((first - first.mean()) ** 2).sum() / (len(first) - 1))
    # targets: squared return of BBB after each window; std over the first num_train = 8 of them
    y = r["BBB"][5:] ** 2
    target_std = np.std(y[:8], ddof=1)
    assert dm.info["input_std"] == pytest.approx(input_std, rel=1e-12)
    assert dm.info["target_std"] == pytest.approx(target_std, rel=1e-12)
    # window 0: returns 0..4 (prices of days 0..5); target: return from day 5 to day 6 of BBB
    item = dm.train_set[0]
    expected_x = np.log(opens["CCC"][1:6] / opens["CCC"][0:5]) / input_std
    np.testing.assert_allclose(item["inputs"]["ccc"].numpy()[:, 0], expected_x, rtol=1e-6)
    assert item["target"].item() == pytest.approx(
        np.log(opens["BBB"][6] / opens["BBB"][5]) ** 2 / target_std, rel=1e-6
    )
    # every window of every split, each split continuing where the last ended
    for split, offset in (("train", 0), ("val", 8), ("test", 11)):
        ds = getattr(dm, f"{split}_set")
        for i in range(len(ds)):
            k = offset + i
            item = ds[i]
            assert set(item["inputs"]) == {"aaa", "bbb", "ccc"}
            for t in TICKERS:
                x = item["inputs"][t.lower()]
                assert x.shape == (5, 1) and x.dtype == torch.float32
                np.testing.assert_allclose(x.numpy()[:, 0], r[t][k : k + 5] / input_std, rtol=1e-6)
            assert item["target"].shape == (1,) and item["target"].dtype == torch.float32
            assert item["target"].item() == pytest.approx(r["BBB"][k + 5] ** 2 / target_std, rel=1e-6)
    days = business_days(24)
    assert dm.info["days"] == [days[0], days[-1]] and dm.info["trading_days"] == 24
    # the target of window k is the return into day k + 6
    assert dm.info["target_days"] == {
        "train": [days[6], days[13]],
        "val": [days[14], days[16]],
        "test": [days[17], days[23]],
    }


def test_normalisation_uses_training_rows_only(prices, tmp_path):
    """Changing every price after the last one a training window sees (day 13) changes neither the
    constants nor any training sample, only validation and test."""
    folder, opens = prices
    before = module(folder)
    other = tmp_path / "changed"
    rng = np.random.default_rng(5)
    for t, o in opens.items():
        changed = o.copy()
        changed[14:] = np.round(changed[14:] * np.exp(rng.normal(0, 0.3, len(o) - 14)), 6)
        StocksDataModule.write(other / f"{t}.csv", business_days(24), changed)
    after = module(other)
    assert (
        after.info["input_std"] == before.info["input_std"]
        and after.info["target_std"] == before.info["target_std"]
    )
    for i in range(len(before.train_set)):
        a, b = before.train_set[i], after.train_set[i]
        assert torch.equal(a["target"], b["target"]) and all(
            torch.equal(a["inputs"][m], b["inputs"][m]) for m in a["inputs"]
        )
    assert not torch.equal(before.val_set[0]["target"], after.val_set[0]["target"])
    assert not torch.equal(before.test_set[6]["inputs"]["aaa"], after.test_set[6]["inputs"]["aaa"])


def multibench_reference(folder: Path, stocks, target: str, window: int, val_split: int, test_split: int):
    """MultiBench's ``get_dataloader`` construction transcribed (files instead of the live fetch)."""
    frames = []
    for s in stocks:
        f = pd.read_csv(folder / f"{s}.csv", parse_dates=True, index_col=0)
        f.insert(0, "Symbol", s)
        frames.append(f)
    data = pd.concat(frames).sort_values(by=["Date", "Symbol"])
    out = np.array([np.where(data["Symbol"] == target)[0][0]])
    x = torch.tensor(list(data["Open"])).view(-1, len(stocks))
    rx = torch.log(x[1:] / x[:-1])
    y = rx[window:, out] ** 2
    rx = rx / torch.std(rx[: window + val_split])
    y = y / torch.std(y[:val_split])
    windows = torch.stack([rx[i : i + window] for i in range(len(rx) - window)])
    return windows, y, sorted(stocks)  # columns follow the symbols' sort order


@pytest.mark.parametrize("quantized", [False, True])
def test_matches_multibench_construction(prices, quantized):
    folder, _ = prices
    dm = module(folder, quantize=quantized)
    xs, ys, columns = multibench_reference(folder, TICKERS, "BBB", 5, 8, 11)
    for split, lo, hi in (("train", 0, 8), ("val", 8, 11), ("test", 11, 18)):
        ds = getattr(dm, f"{split}_set")
        assert len(ds) == hi - lo
        for i in range(len(ds)):
            ref = quantize(xs[lo + i]) if quantized else xs[lo + i]
            ours = torch.cat([ds[i]["inputs"][c.lower()] for c in columns], dim=1)
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(ds[i]["target"], ys[lo + i], rtol=1e-4, atol=1e-6)


def test_trading_days_are_intersected_and_dates_bound_the_range(tmp_path):
    folder = tmp_path / "stocks"
    days = business_days(30)
    opens = {t: random_opens(30, i) for i, t in enumerate(TICKERS)}
    StocksDataModule.write(folder / "AAA.csv", days, opens["AAA"])
    StocksDataModule.write(folder / "BBB.csv", days[2:], opens["BBB"][2:])  # starts later (like GOOG)
    keep = [i for i in range(30) if i not in (10, 11)]  # two missing days in the middle
    StocksDataModule.write(folder / "CCC.csv", [days[i] for i in keep], opens["CCC"][keep])
    dm = module(folder)
    common = [i for i in range(2, 30) if i not in (10, 11)]
    assert dm.info["trading_days"] == len(common) == 26
    assert dm.info["days"] == [days[2], days[29]]
    assert dm.info["dropped_days"] == {"AAA": 4, "BBB": 2, "CCC": 2}
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (8, 3, 26 - 1 - 5 - 11)
    # returns run between consecutive common days: window 5 spans day 9 -> day 12 for AAA
    r = np.log(opens["AAA"][common][1:] / opens["AAA"][common][:-1]) / dm.info["input_std"]
    assert r[7] == pytest.approx(np.log(opens["AAA"][12] / opens["AAA"][9]) / dm.info["input_std"])
    np.testing.assert_allclose(dm.train_set[3]["inputs"]["aaa"].numpy()[:, 0], r[3:8], rtol=1e-6)
    # start/end dates are inclusive bounds on top of the intersection
    bounded = module(folder, start_date=days[4], end_date=days[27])
    assert bounded.info["days"] == [days[4], days[27]] and bounded.info["trading_days"] == 26 - 4


def test_input_subset_keeps_normalisation_over_all_tickers(prices):
    folder, _ = prices
    full = module(folder)
    sub = module(folder, modalities=["AAA", "ccc"])  # keys are case-insensitive tickers
    assert sub.modalities == ["aaa", "ccc"] and sub.input_dims == {"aaa": 5, "ccc": 5}
    assert sub.info["input_std"] == full.info["input_std"]
    item, ref = sub.test_set[2], full.test_set[2]
    assert set(item["inputs"]) == {"aaa", "ccc"}
    assert torch.equal(item["inputs"]["ccc"], ref["inputs"]["ccc"]) and torch.equal(
        item["target"], ref["target"]
    )


def test_batches_follow_the_contract_and_describe_is_json(prices):
    folder, _ = prices
    dm = module(folder, quantize=True)
    assert (
        dm.task_type == "regression"
        and dm.num_outputs == 1
        and dm.monitor == {"metric": "val/loss", "mode": "min"}
    )
    batch = next(iter(dm.train_dataloader()))
    assert batch["inputs"]["aaa"].shape == (4, 5, 1) and batch["target"].shape == (4, 1)
    record = json.loads(json.dumps(dm.describe()))
    assert record["sizes"] == {"train": 8, "val": 3, "test": 7}
    assert record["stocks"]["target"] == "BBB" and record["stocks"]["quantize"] == 25
    assert StocksDataModule(data_dir=folder).batch_size == 16


# -- quantisation ------------------------------------------------------------------------------


def test_quantize_function_by_hand():
    x = torch.tensor([[0.0, 0.3], [1.0, 0.51]])
    # 25 steps of 0.04 between min 0 and max 1: 0.3 -> 7.5 -> 8 (round half to even) -> 0.32;
    # 0.51 -> 12.75 -> 13 -> 0.52
    torch.testing.assert_close(quantize(x), torch.tensor([[0.0, 0.32], [1.0, 0.52]]))
    torch.testing.assert_close(
        quantize(torch.tensor([-2.0, -1.0, 2.0]), levels=4), torch.tensor([-2.0, -1.0, 2.0])
    )
    flat = torch.full((5, 2), 0.7)
    assert torch.equal(quantize(flat), flat)  # MultiBench would divide 0 by 0


def test_quantize_option_applies_jointly_per_window_in_every_split(prices):
    folder, _ = prices
    raw, quant = module(folder, quantize=False), module(folder, quantize=True, quantize_levels=3)
    for split in ("train", "val", "test"):
        for i in range(len(getattr(raw, f"{split}_set"))):
            a, b = getattr(raw, f"{split}_set")[i], getattr(quant, f"{split}_set")[i]
            x_raw = torch.cat([a["inputs"][m] for m in raw.modalities], 1)
            x_q = torch.cat([b["inputs"][m] for m in quant.modalities], 1)
            lo, hi = x_raw.min(), x_raw.max()
            steps = (x_q - lo) / (hi - lo) * 3
            torch.testing.assert_close(steps, steps.round(), atol=1e-5, rtol=0)  # on the window's joint grid
            assert x_q.min() == lo and torch.isclose(x_q.max(), hi)
            assert (x_q - x_raw).abs().max() <= (hi - lo) / 6 + 1e-6
            assert torch.equal(a["target"], b["target"])  # targets are never quantised


# -- errors ------------------------------------------------------------------------------------


def test_ticker_without_file(prices):
    folder, _ = prices
    dm = StocksDataModule(sector=None, tickers=["AAA", "ZZZ"], target="AAA", data_dir=folder, **SMALL)
    with pytest.raises(
        DatasetError,
        match=r"no price file for ticker\(s\) \['ZZZ'\].*ZZZ\.csv.*cover \['AAA', 'BBB', 'CCC'\]",
    ):
        dm.prepare_data()
    dm = StocksDataModule(sector="fnb", data_dir=folder / "nope")
    with pytest.raises(DatasetError, match=r"The folder does not exist.*paths.data_dir"):
        dm.setup()


def test_unknown_sector_and_bad_ticker_lists(tmp_path):
    with pytest.raises(
        DatasetError, match=r"Unknown stock sector 'energy'; choose one of \['fnb', 'health', 'tech'\]"
    ):
        StocksDataModule(sector="energy", data_dir=tmp_path)
    with pytest.raises(DatasetError, match=r"sector=null needs both"):
        StocksDataModule(sector=None, tickers=["AAA"], data_dir=tmp_path)
    with pytest.raises(DatasetError, match=r"lists \['AAA'\] more than once"):
        StocksDataModule(sector=None, tickers=["AAA", "aaa"], target="AAA", data_dir=tmp_path)
    with pytest.raises(DatasetError, match=r"must be a non-empty list"):
        StocksDataModule(tickers="AAA", target="AAA", data_dir=tmp_path)


def test_target_not_among_tickers(tmp_path):
    with pytest.raises(DatasetError, match=r"Target stock 'XYZ' is not among the tickers \['AAA', 'BBB'\]"):
        StocksDataModule(sector=None, tickers=["AAA", "BBB"], target="XYZ", data_dir=tmp_path)
    with pytest.raises(
        DatasetError, match=r"Target stock 'MCD'.*sector health's default is UNH.*stocks_health"
    ):
        StocksDataModule(sector="health", target="MCD", data_dir=tmp_path)
    assert StocksDataModule(sector="tech", data_dir=tmp_path).target == "MSFT"


def test_too_few_common_days(tmp_path):
    folder = tmp_path / "stocks"
    write_prices(folder, n_days=18)  # exactly window + train + val + 1 test window + 1
    assert len(module(folder).test_set) == 1
    days = business_days(18)
    StocksDataModule.write(folder / "CCC.csv", days[1:], random_opens(17, 9))  # one day short
    with pytest.raises(
        DatasetError,
        match=r"share only 17 trading days .*at least 18 are needed .*drop the ticker that starts last \(CCC",
    ):
        module(folder)


@pytest.mark.parametrize(
    "row, match",
    [
        (
            "{d},null,null,null,null,null,null",
            r"1 row\(s\) with empty, 'null' or unparsable values, e\.g\. line 7 \(2001-01-09\)",
        ),
        ("{d},,,,,,", r"row\(s\) with empty.*line 7 \(2001-01-09\)"),
        ("{d},12.5,13,12,12.5,12.5,", r"row\(s\) with empty.*line 7"),
        ("2001-13-45,12.5,13,12,12.5,12.5,100", r"unparsable.*line 7 \(2001-13-45\)"),
        ("{d},0.000000,1,0,1,1,100", r"non-positive Open prices on \['2001-01-09'\]"),
        ("2001-01-08,12.5,13,12,12.5,12.5,100", r"same date more than once \(\['2001-01-08'\]\)"),
    ],
)
def test_bad_rows_in_a_price_file(prices, row, match):
    folder, _ = prices
    path = folder / "BBB.csv"
    lines = path.read_text().split("\n")
    assert lines[6].startswith("2001-01-09")  # line 7 of the file: the 6th trading day
    lines[6] = row.format(d="2001-01-09")
    path.write_text("\n".join(lines))
    with pytest.raises(DatasetError, match=match) as e:
        module(folder)
    assert "BBB.csv" in str(e.value)


@pytest.mark.parametrize(
    "text, match",
    [
        ("", r"not a readable price CSV"),
        ("Date,Open,High,Low,Close,Adj Close,Volume", r"header but no price rows"),
        ("Day,Price\n2001-01-02,1.0", r"columns \['Day', 'Price'\]; expected Yahoo's header"),
    ],
)
def test_empty_or_foreign_files(prices, text, match):
    folder, _ = prices
    (folder / "AAA.csv").write_text(text)
    with pytest.raises(DatasetError, match=match):
        module(folder)


def test_checksum_mismatch_is_explained(tmp_path):
    folder = tmp_path / "stocks"
    folder.mkdir()
    for t in SECTORS["health"]:
        shutil.copy(SNAPSHOT / f"{t}.csv", folder)
    with open(folder / "UNH.csv", "a") as f:
        f.write("\n")
    checksums = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "dataset" / "stocks.yaml").checksums)
    dm = StocksDataModule(sector="health", data_dir=folder, checksums=checksums)
    with pytest.raises(
        DatasetError, match=r"does not match the published files: UNH\.csv: sha256.*verify_checksums=false"
    ):
        dm.prepare_data()
    StocksDataModule(
        sector="health", data_dir=folder, checksums=checksums, verify_checksums=False
    ).prepare_data()


# -- the shipped snapshot ----------------------------------------------------------------------

REAL = {  # config -> (sector, target, tickers, trading days, first day, last day, test windows)
    "stocks": ("fnb", "MCD", 13, 5218, "2000-06-01", "2021-02-26", 1017),
    "stocks_health": ("health", "UNH", 11, 5218, "2000-06-01", "2021-02-26", 1017),
    "stocks_tech": ("tech", "MSFT", 14, 4922, "2004-08-19", "2024-03-08", 721),
}


def test_snapshot_checksums_cover_every_shipped_file():
    checksums = OmegaConf.load(ROOT / "configs" / "dataset" / "stocks.yaml").checksums
    files = sorted(p.name for p in SNAPSHOT.glob("*.csv"))
    assert (
        files == sorted(checksums) == sorted(f"{t}.csv" for s in SECTORS.values() for t in s)
        and len(files) == 38
    )
    for f in files:
        assert checksums[f] == f"sha256:{sha256_file(SNAPSHOT / f)}", f
    provenance = (SNAPSHOT / "PROVENANCE.md").read_text()
    assert all(checksums[f].split(":")[1] in provenance for f in files)


@pytest.mark.parametrize("config", sorted(REAL))
def test_snapshot_loads_per_sector(config):
    sector, target, n_tickers, days, first, last, n_test = REAL[config]
    cfg = compose_cfg([f"dataset={config}"])
    dm = instantiate(cfg.dataset, _convert_="all")
    assert (dm.name, dm.sector, dm.target) == (f"stocks_{sector}", sector, target)
    assert list(cfg.backbone) == ["_default_"]  # one encoder config for every stock of the sector
    assert dm.modalities == sorted(t.lower() for t in SECTORS[sector])
    dm.prepare_data()  # verifies the sha256 of the sector's files
    dm.setup()
    assert len(dm.modalities) == n_tickers and dm.input_dims == {m: 500 for m in dm.modalities}
    assert (dm.info["trading_days"], *dm.info["days"]) == (days, first, last)
    assert dm.info["dropped_days"] == {}
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (3200, 500, n_test)
    item = dm.test_set[n_test - 1]
    assert item["inputs"][target.lower()].shape == (500, 1) and torch.isfinite(item["target"]).all()
    assert dm.info["target_days"]["test"][1] == last
    assert dm.batch_size == 16 and dm.quantize


def test_snapshot_runs_through_the_framework():
    cfg = compose_cfg(["dataset=stocks", "fusion=concat"])
    dm, task = build(cfg)
    batch = next(iter(dm.train_dataloader()))
    out = task(batch["inputs"])
    assert out.logits.shape == batch["target"].shape == (16, 1)
