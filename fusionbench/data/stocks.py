"""Multimodal stock time series (Pro-Fusion; MultiBench ``datasets/stocks``, Sardelich & Manandhar 2018).

Within a sector every stock is a modality: the input of modality ``mcd`` is the previous ``window``
(500) daily log returns of MCD's Open price, shape ``(window, 1)``; the target is the next squared
log return of the target stock (a volatility proxy), a regression with one output, metric MSE.

Files: ``<TICKER>.csv`` per ticker in Yahoo's classic download layout
(``Date,Open,High,Low,Close,Adj Close,Volume``, ISO dates, one row per trading day), as MultiBench's
``get_data.py`` fetched live from an endpoint that no longer works; ``data/stocks`` ships a frozen
snapshot (see its PROVENANCE.md). Only ``Date`` and ``Open`` are used.

Construction, as MultiBench's ``get_dataloader`` (window_size=500, val_split=3200, test_split=3700):

1. Open prices of all ``tickers`` on the trading days in ``[start_date, end_date]`` that *every* ticker
   has (MultiBench reshapes a long table and silently assumes equal calendars; we intersect).
2. ``r_t = log(Open_{t+1} / Open_t)``; sample ``i`` has inputs ``r_i .. r_{i+window-1}`` and target
   ``r_{i+window}^2`` of the target stock, for ``i = 0 .. len(r) - window - 1``.
3. Inputs are divided by one scalar, the (unbiased) std of ``r`` over the first ``window + num_train``
   returns and all tickers; targets by the std of the first ``num_train`` targets. Both come from
   rows that only training windows see (no validation/test leakage).
4. Windows ``0 .. num_train-1`` train, the next ``num_val`` validation, the rest test (chronological).
5. ``quantize`` (MultiBench's "data augmentation" ``quantize`` in ``__getitem__``, all splits):
   each sample's inputs (all input tickers of the window together) are rounded to
   ``quantize_levels`` (25) equal steps between the window's min and max. It is deterministic.
   Default **on**: Pro-Fusion follows MultiBench's setup, whose loader always quantises, so the
   published MSEs (Pro-Fusion's and MultiBench's reference values) include it; set ``quantize=false``
   for the raw normalised returns.

Differences from MultiBench, all deliberate: dates are intersected (above); returns are computed in
float64 and served as float32 (MultiBench: float32 throughout; differences at float32 rounding level,
~1e-5 absolute on the normalised values of the real F&B data); a window
whose inputs are all equal is served unchanged instead of 0/0 = NaN by the quantisation.

Sectors (ticker lists of Pro-Fusion's appendix "Financial Data Details"); default targets follow
MultiBench's README examples (``--target-stock``), the stocks Pro-Fusion's reference runs most
likely predicted: F&B -> MCD, HEALTH -> UNH, TECH -> MSFT. Default dates: MultiBench's
2000-06-01 .. 2021-02-28 for F&B and HEALTH. TECH includes GOOG (IPO 2004-08-19); its common days in
MultiBench's window give only 3,659 windows (no test split), so TECH starts 2004-08-19 and runs to the
end of the snapshot, 2024-03-08 (MultiBench's loader cannot run the TECH list at all: its reshape needs
equal row counts). On the shipped snapshot (window 500, 3,200 / 500 / rest):

| sector | tickers | common trading days | windows: train / val / test |
| --- | --- | --- | --- |
| fnb | 13 | 5,218: 2000-06-01 .. 2021-02-26 | 3,200 / 500 / 1,017 |
| health | 11 | 5,218: 2000-06-01 .. 2021-02-26 | 3,200 / 500 / 1,017 |
| tech | 14 | 4,922: 2004-08-19 .. 2024-03-08 | 3,200 / 500 / 721 |

| sector | target days: train | target days: val | target days: test |
| --- | --- | --- | --- |
| fnb | 2002-06-04 .. 2015-02-18 | 2015-02-19 .. 2017-02-10 | 2017-02-13 .. 2021-02-26 |
| health | 2002-06-04 .. 2015-02-18 | 2015-02-19 .. 2017-02-10 | 2017-02-13 .. 2021-02-26 |
| tech | 2006-08-15 .. 2019-05-02 | 2019-05-03 .. 2021-04-27 | 2021-04-28 .. 2024-03-08 |

(A window's target day is the day whose Open ends the predicted return; its inputs end one day earlier.)
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from fusionbench import ROOT
from fusionbench.data.base import FusionDataModule
from fusionbench.errors import DatasetError

log = logging.getLogger("fusionbench")

SECTORS: dict[str, tuple[str, ...]] = {
    "fnb": ("CAG", "CPB", "DRI", "GIS", "HRL", "HSY", "K", "MCD", "MKC", "SBUX", "SJM", "TSN", "YUM"),
    "health": ("MRK", "WST", "CVS", "MCK", "ABT", "UNH", "TFX", "PFE", "GSK", "NVS", "WBA"),
    "tech": (
        "AAPL",
        "ADBE",
        "AMD",
        "AMZN",
        "GOOG",
        "HPQ",
        "IBM",
        "INTC",
        "MSFT",
        "MSI",
        "NVDA",
        "ORCL",
        "QCOM",
        "ZBRA",
    ),
}
DEFAULT_TARGETS = {"fnb": "MCD", "health": "UNH", "tech": "MSFT"}
MULTIBENCH_DATES = ("2000-06-01", "2021-02-28")
DEFAULT_DATES = {"fnb": MULTIBENCH_DATES, "health": MULTIBENCH_DATES, "tech": ("2004-08-19", "2024-03-08")}
COLUMNS = ("Date", "Open", "High", "Low", "Close", "Adj Close", "Volume")
HOW_TO_GET = (
    "The snapshot ships with fusionbench in data/stocks (38 Yahoo Finance CSVs, see "
    "data/stocks/PROVENANCE.md); other tickers need a file <TICKER>.csv in Yahoo's layout "
    "(Date,Open,High,Low,Close,Adj Close,Volume)."
)
_TICKER = re.compile(r"^[A-Z0-9][A-Z0-9.\-]*$")


def modality_key(ticker: str) -> str:
    """Lowercase modality key of a ticker (``MCD`` -> ``mcd``, ``BRK.B`` -> ``brk_b``)."""
    return re.sub(r"[^a-z0-9]+", "_", ticker.lower())


def quantize(x: torch.Tensor, levels: int = 25) -> torch.Tensor:
    """MultiBench's per-sample quantisation: ``levels`` equal steps between the min and max of ``x``."""
    hi, lo = torch.max(x), torch.min(x)
    if hi == lo:
        return x.clone()
    x = (x - lo) * levels / (hi - lo)
    x = torch.round(x)
    return x * (hi - lo) / levels + lo


class StockWindows(Dataset):
    """Sliding windows over shared normalised returns, served in the batch contract.

    Sample ``i`` is window ``s = starts[i]``: inputs ``returns[s : s + window]`` split into one
    ``(window, 1)`` tensor per modality, target ``target[s]`` as shape ``(1,)``.
    """

    def __init__(
        self,
        returns: torch.Tensor,
        modalities: Sequence[str],
        target: torch.Tensor,
        starts: range,
        window: int,
        levels: int | None,
        corrupt: Callable[[Mapping[str, torch.Tensor], int], dict] | None = None,
    ) -> None:
        self.returns, self.modalities, self.target = returns, list(modalities), target
        self.starts, self.window, self.levels = starts, int(window), levels
        self.corrupt = corrupt  # robustness noise on the raw window, before quantisation (as MultiBench)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.starts[i]
        x = self.returns[s : s + self.window]
        if self.corrupt is not None:
            noisy = self.corrupt({m: x[:, j : j + 1] for j, m in enumerate(self.modalities)}, i)
            x = torch.cat([noisy[m] for m in self.modalities], dim=1)
        if self.levels:
            x = quantize(x, self.levels)
        return {
            "inputs": {m: x[:, j : j + 1].clone() for j, m in enumerate(self.modalities)},
            "target": self.target[s : s + 1].clone(),
        }


class StocksDataModule(FusionDataModule):
    """Next-day volatility of one stock from the return histories of its sector (regression).

    Args:
        sector: ``fnb``, ``health`` or ``tech`` (Pro-Fusion's lists, `SECTORS`); sets the default
            tickers, target and dates. ``None`` requires ``tickers`` and ``target``.
        tickers: custom ticker list (replaces the sector's); every ticker needs ``<TICKER><suffix>``.
        target: ticker whose next squared return is predicted; must be among ``tickers``
            (default: the sector's, `DEFAULT_TARGETS`).
        modalities: subset of the tickers' keys (lowercase) used as inputs (default all). The
            normalisation still uses all tickers, like MultiBench's ``input_stocks`` within ``stocks``.
        start_date, end_date: ``YYYY-MM-DD``, inclusive (default: the sector's, `DEFAULT_DATES`).
        window: returns per input window (MultiBench ``window_size``).
        num_train: training windows (MultiBench ``val_split``).
        num_val: validation windows after them (MultiBench ``test_split - val_split``); the rest is test.
        quantize: MultiBench's per-sample quantisation in all splits (module docstring, step 5).
        quantize_levels: its number of steps.
        suffix: file name ending, ``.csv`` (or ``.csv.gz``; pandas decompresses it).
        **kwargs: `FusionDataModule` arguments (``name`` defaults to ``stocks_<sector>``,
            ``batch_size`` to 16 and ``monitor`` to ``val/loss``/``min`` as in MultiBench).
    """

    task_type = "regression"
    num_outputs = 1

    def __init__(
        self,
        sector: str | None = "fnb",
        tickers: Sequence[str] | None = None,
        target: str | None = None,
        modalities: Sequence[str] | None = None,
        start_date: str | None = None,
        end_date: str | None = None,
        window: int = 500,
        num_train: int = 3200,
        num_val: int = 500,
        quantize: bool = True,
        quantize_levels: int = 25,
        suffix: str = ".csv",
        **kwargs,
    ) -> None:
        kwargs.setdefault("name", f"stocks_{sector}" if sector else "stocks")
        kwargs.setdefault("data_dir", ROOT / "data" / "stocks")
        kwargs.setdefault("batch_size", 16)
        kwargs.setdefault("monitor", {"metric": "val/loss", "mode": "min"})
        kwargs.setdefault("how_to_get", HOW_TO_GET)
        super().__init__(**kwargs)
        if sector is not None and sector not in SECTORS:
            raise DatasetError(
                f"Unknown stock sector {sector!r}; choose one of {sorted(SECTORS)} (dataset=stocks, "
                "stocks_health, stocks_tech), or set `dataset.sector=null` with your own `dataset.tickers` "
                "and `dataset.target`."
            )
        if sector is None and (not tickers or not target):
            raise DatasetError(
                "dataset.sector=null needs both `dataset.tickers` (a list) and `dataset.target` "
                "(one of them)."
            )
        self.sector = sector
        self.tickers = self._check_tickers(tickers if tickers is not None else SECTORS[sector])
        self.target = str(target if target is not None else DEFAULT_TARGETS[sector]).upper()
        if self.target not in self.tickers:
            hint = (
                f" (sector {sector}'s default is {DEFAULT_TARGETS[sector]}; dataset=stocks, stocks_health "
                "and stocks_tech set sector, target, dates and backbone together)"
                if sector
                else ""
            )
            raise DatasetError(
                f"Target stock {self.target!r} is not among the tickers {list(self.tickers)}; set "
                f"`dataset.target` to one of them{hint}, or add it to `dataset.tickers`."
            )
        self.keys = {modality_key(t): t for t in self.tickers}
        if len(self.keys) != len(self.tickers):
            raise DatasetError(
                f"Tickers {list(self.tickers)} map to clashing modality keys {sorted(self.keys)}."
            )
        wanted = None if modalities is None else [modality_key(str(m)) for m in modalities]
        self.modalities = self.select_modalities(sorted(self.keys), wanted)
        default_dates = DEFAULT_DATES[sector] if sector else MULTIBENCH_DATES
        self.start_date = self._parse_date(start_date or default_dates[0], "start_date")
        self.end_date = self._parse_date(end_date or default_dates[1], "end_date")
        if self.start_date > self.end_date:
            raise DatasetError(
                f"dataset.start_date {self.start_date.date()} is after dataset.end_date "
                f"{self.end_date.date()}."
            )
        for key, value in (
            ("window", window),
            ("num_train", num_train),
            ("num_val", num_val),
            ("quantize_levels", quantize_levels),
        ):
            if int(value) < 1:
                raise DatasetError(f"dataset.{key} must be a positive integer, got {value}.")
        self.window, self.num_train, self.num_val = int(window), int(num_train), int(num_val)
        self.quantize, self.quantize_levels = bool(quantize), int(quantize_levels)
        self.suffix = suffix
        self.input_dims = {m: self.window for m in self.modalities}
        self.info: dict[str, Any] = {}

    @staticmethod
    def _check_tickers(tickers: Sequence[str]) -> tuple[str, ...]:
        if isinstance(tickers, str) or not tickers:
            raise DatasetError(
                f"dataset.tickers must be a non-empty list of ticker symbols, got {tickers!r}."
            )
        out = tuple(str(t).upper() for t in tickers)
        bad = [t for t in out if not _TICKER.match(t)]
        if bad:
            raise DatasetError(
                f"dataset.tickers has invalid symbols {bad}; use Yahoo symbols such as MCD or BRK-B."
            )
        dup = sorted({t for t in out if out.count(t) > 1})
        if dup:
            raise DatasetError(f"dataset.tickers lists {dup} more than once; list each ticker once.")
        return out

    @staticmethod
    def _parse_date(value: Any, key: str) -> pd.Timestamp:
        try:
            return pd.Timestamp(str(value))
        except ValueError:
            raise DatasetError(
                f"dataset.{key}={value!r} is not a date; use YYYY-MM-DD, e.g. 2000-06-01."
            ) from None

    # -- guard -------------------------------------------------------------------------------
    def required_files(self) -> list[str]:
        return [f"{t}{self.suffix}" for t in self.tickers]

    def prepare_data(self) -> None:
        """Name tickers without a file (and what is there), then the base guard (checksums)."""
        missing = [t for t in self.tickers if not (self.data_dir / f"{t}{self.suffix}").is_file()]
        if missing:
            if self.data_dir.is_dir():
                there = sorted(p.name[: -len(self.suffix)] for p in self.data_dir.glob(f"*{self.suffix}"))
                found = f"Files there cover {there}." if there else f"It holds no *{self.suffix} files."
            else:
                found = "The folder does not exist."
            raise DatasetError(
                f"Dataset '{self.name}': no price file for ticker(s) {missing} in {self.data_dir} "
                f"(expected {', '.join(t + self.suffix for t in missing)}). {found} Fix `dataset.tickers` / "
                f"`dataset.sector` or add the file(s). {self.how_to_get} Point `paths.data_dir=DIR` (or "
                "FUSIONBENCH_DATA_DIR) at the folder that holds stocks/."
            )
        super().prepare_data()

    # -- loading -----------------------------------------------------------------------------
    def read_prices(self, ticker: str) -> pd.Series:
        """Open prices of one file indexed by date (sorted), after checking the file's content."""
        path = self.data_dir / f"{ticker}{self.suffix}"
        redo = f"Re-obtain the file ({self.how_to_get})"
        try:
            df = pd.read_csv(path, dtype={"Date": str})
        except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError, OSError) as e:
            raise DatasetError(f"{path} is not a readable price CSV ({e}). {redo}") from None
        if "Date" not in df.columns or "Open" not in df.columns:
            raise DatasetError(
                f"{path} has columns {list(df.columns)}; expected Yahoo's header {','.join(COLUMNS)} (at "
                f"least Date and Open). {redo}"
            )
        if df.empty:
            raise DatasetError(f"{path} has a header but no price rows. {redo}")
        df["Open"] = pd.to_numeric(df["Open"], errors="coerce")
        dates = pd.to_datetime(df["Date"], format="%Y-%m-%d", errors="coerce")
        bad = df.isna().any(axis=1) | dates.isna()
        if bad.any():
            rows = [f"line {i + 2} ({df['Date'].iloc[i]})" for i in np.flatnonzero(bad.to_numpy())[:5]]
            raise DatasetError(
                f"{path} has {int(bad.sum())} row(s) with empty, 'null' or unparsable values, e.g. "
                f"{', '.join(rows)}. "
                f"{redo}, or delete those rows (days missing in one file are dropped for all tickers)."
            )
        if (df["Open"] <= 0).any():
            rows = [str(df["Date"].iloc[i]) for i in np.flatnonzero((df["Open"] <= 0).to_numpy())[:5]]
            raise DatasetError(
                f"{path} has non-positive Open prices on {rows}; log returns need positive prices. {redo}"
            )
        if dates.duplicated().any():
            dup = sorted(set(df["Date"][dates.duplicated().to_numpy()]))[:5]
            raise DatasetError(f"{path} lists the same date more than once ({dup}). {redo}")
        return pd.Series(
            df["Open"].to_numpy(dtype=np.float64), index=pd.DatetimeIndex(dates), name=ticker
        ).sort_index()

    def _load(self) -> None:
        series = {t: self.read_prices(t) for t in self.tickers}
        in_range = {
            t: s[(s.index >= self.start_date) & (s.index <= self.end_date)] for t, s in series.items()
        }
        common = None
        for s in in_range.values():
            common = s.index if common is None else common.intersection(s.index)
        common = common.sort_values()
        need = (
            self.window + self.num_train + self.num_val + 2
        )  # +1 test window, +1 price for the first return
        if len(common) < need:
            latest = max(
                in_range, key=lambda t: in_range[t].index.min() if len(in_range[t]) else pd.Timestamp.max
            )
            first = in_range[latest].index.min() if len(in_range[latest]) else None
            span = f" ({common[0].date()} .. {common[-1].date()})" if len(common) else ""
            raise DatasetError(
                f"Dataset '{self.name}': tickers {list(self.tickers)} share only {len(common)} trading "
                f"days{span} in {self.start_date.date()} .. {self.end_date.date()}; at least {need} are "
                f"needed (window {self.window} + {self.num_train} train + {self.num_val} validation windows "
                "+ 1 test window + 1 for the first return). Widen `dataset.start_date` / `dataset.end_date`, "
                f"or drop the ticker that starts last ({latest}, first day in range "
                f"{first.date() if first is not None else 'none'})."
            )
        dropped = {t: len(s) - len(common) for t, s in in_range.items() if len(s) != len(common)}
        if dropped:
            log.info("stocks: days not shared by all tickers dropped per ticker: %s", dropped)
        opens = np.stack(
            [in_range[t].loc[common].to_numpy() for t in self.tickers], axis=1
        )  # (days, tickers)
        r = np.log(opens[1:] / opens[:-1])
        y = r[self.window :, self.tickers.index(self.target)] ** 2
        input_std = float(r[: self.window + self.num_train].std(ddof=1))
        target_std = float(y[: self.num_train].std(ddof=1))
        if not (input_std > 0 and target_std > 0):
            raise DatasetError(
                f"Dataset '{self.name}': the training rows have zero variance (input std {input_std}, "
                f"target std {target_std}); the prices are constant. Check the price files."
            )
        cols = [self.tickers.index(self.keys[m]) for m in self.modalities]
        returns = torch.from_numpy(r[:, cols] / input_std).float()
        target = torch.from_numpy(y / target_std).float()
        n = len(y)
        a, b = self.num_train, self.num_train + self.num_val
        levels = self.quantize_levels if self.quantize else None

        def make(starts: range) -> StockWindows:
            return StockWindows(returns, self.modalities, target, starts, self.window, levels)

        def day(k: int) -> str:  # the target of window s is the return into day s + window + 1
            return str(common[k].date())

        self.train_set, self.val_set, self.test_set = make(range(a)), make(range(a, b)), make(range(b, n))
        self.info = {
            "sector": self.sector,
            "tickers": list(self.tickers),
            "target": self.target,
            "days": [day(0), day(len(common) - 1)],
            "trading_days": len(common),
            "dropped_days": dropped,
            "target_days": {
                s: [day(lo + self.window + 1), day(hi - 1 + self.window + 1)]
                for s, (lo, hi) in {"train": (0, a), "val": (a, b), "test": (b, n)}.items()
            },
            "input_std": input_std,
            "target_std": target_std,
            "window": self.window,
            "quantize": self.quantize_levels if self.quantize else False,
        }

    def robustness_set(self, corrupt: Callable[[Mapping[str, torch.Tensor], int], dict]) -> StockWindows:
        """The test windows corrupted before quantisation, as MultiBench's robustness loaders do."""
        t = self.test_set
        return StockWindows(t.returns, t.modalities, t.target, t.starts, t.window, t.levels, corrupt=corrupt)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["stocks"] = self.info
        return out

    @staticmethod
    def write(path: Path, dates: Sequence[str], opens: Sequence[float]) -> Path:
        """Write one price file in Yahoo's layout (6 decimals, no trailing newline), e.g. fixtures for
        tests; Close is the next Open, High/Low bracket both, Volume is a row counter."""
        opens = np.asarray(opens, dtype=np.float64)
        closes = np.append(opens[1:], opens[-1])
        lines = [",".join(COLUMNS)]
        for i, (d, o, c) in enumerate(zip(dates, opens, closes)):
            hi, lo = max(o, c) * 1.01, min(o, c) * 0.99
            lines.append(f"{d},{o:.6f},{hi:.6f},{lo:.6f},{c:.6f},{c:.6f},{1000000 + i}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines))
        return path
