"""Run-by-run tables (``kind: runs``): one line per row and expected seed instead of a mean.

For rows whose seeds disagree more than a mean ± std can say (a model that learns a constant at some
seeds and not at others): each seed's metrics, the epoch its tested checkpoint is from (``k of n``: the
record's ``best_val``, or the checkpoint's name where the recipe tests its last epoch) and its wall time.
A row with ``baseline: <experiment>`` adds the difference of the first metric to that experiment's run of
the same seed (Pro-Fusion minus its base, paired). ``history: [train/loss]`` adds a column per key with the
run's value after every epoch (the record's ``history``, `fusionbench.callbacks.EpochLog`), so a run that
never fits its training set shows it. A seed without a run keeps its line, with dashes and the command
that makes it.
"""

from __future__ import annotations

import csv
import io
import math
import re
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:  # build.py imports this module
    from fusionbench.tables.build import TableSpec

DASH = "—"


def _value(sel: pd.DataFrame, key: str) -> float | None:
    if not len(sel) or key not in sel:
        return None
    v = pd.to_numeric(sel[key], errors="coerce").iloc[0]
    return None if pd.isna(v) else float(v)


def _run(runs: pd.DataFrame, experiment: str, seed: int) -> pd.DataFrame:
    if not len(runs):
        return runs
    return runs[
        (runs["experiment_name"] == experiment) & (pd.to_numeric(runs["seed"], errors="coerce") == seed)
    ]


def run_rows(spec: TableSpec, runs: pd.DataFrame) -> list[dict[str, Any]]:
    """One dict per (row, seed 0..seeds-1): the metrics of that run (None where there is none)."""
    out = []
    first = spec.metrics[0].key
    for row in spec.rows:
        for seed in range(spec.seeds):
            sel = _run(runs, row["experiment"], seed)
            tested, selected = _tested_epoch(sel)
            entry: dict[str, Any] = {
                "label": row["label"],
                "experiment": row["experiment"],
                "seed": seed,
                "found": bool(len(sel)),
                "values": {m.key: _value(sel, m.key) for m in spec.metrics},
                "tested_epoch": tested,
                "selected": selected,
                "epochs_trained": _value(sel, "epochs_trained"),
                "wall_time_s": _value(sel, "wall_time_s"),
                "delta": None,
                "history": {key: _history(sel, key) for key in spec.history},
            }
            if row.get("baseline") and entry["values"][first] is not None:
                base = _value(_run(runs, row["baseline"], seed), first)
                entry["delta"] = None if base is None else entry["values"][first] - base
            out.append(entry)
    return out


def _history(sel: pd.DataFrame, key: str) -> list[float | None] | None:
    """``key``'s value after every epoch of the run (None for an epoch without it), or None: no history."""
    if not len(sel) or "history" not in sel:
        return None
    history = sel["history"].iloc[0]
    if not isinstance(history, list) or not history:
        return None
    return [None if entry.get(key) is None else float(entry[key]) for entry in history]


def _tested_epoch(sel: pd.DataFrame) -> tuple[float | None, bool]:
    """(epoch of the tested checkpoint counted from 0, whether validation chose it): the record's
    ``best_val``, else the checkpoint's file name (a recipe that tests its last epoch selects nothing)."""
    best = _value(sel, "best_epoch")
    if best is not None:
        return best, True
    name = str(sel["test_checkpoint"].iloc[0]) if len(sel) and "test_checkpoint" in sel else ""
    match = re.fullmatch(r"epoch(\d+)\.ckpt", name)
    return (float(match.group(1)), False) if match else (None, False)


def _epoch(r: dict[str, Any]) -> str:
    if r["tested_epoch"] is None:
        return DASH
    tested = f"{int(r['tested_epoch']) + 1}"  # records count epochs from 0
    if r["epochs_trained"] is not None:
        tested += f" of {int(r['epochs_trained'])}"
    return tested if r["selected"] else f"{tested}, no selection"


def _curve(values: list[float | None] | None, sep: str = ", ", spec: str = ".3f") -> str:
    if not values:
        return DASH
    return sep.join("?" if v is None else f"{v:{spec}}" for v in values)


def _fmt(value: float | None, digits: int, scale: float = 1.0, sign: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return DASH
    return f"{value * scale:{'+' if sign else ''}.{digits}f}"


def runs_markdown(spec: TableSpec, rows: list[dict[str, Any]]) -> str:
    first = spec.metrics[0]
    paired = any(row.get("baseline") for row in spec.rows)
    head = ["Method", "seed"] + [m.label for m in spec.metrics]
    if paired:
        head.append(f"Δ {first.label} vs base, same seed")
    head += [f"{key} by epoch" for key in spec.history]
    head += ["tested epoch", "s/run"]
    lines = [f"### {spec.title}", ""]
    if spec.caption:
        lines += [spec.caption.strip(), ""]
    lines += ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |"]
    for r in rows:
        cells = [r["label"], str(r["seed"])] + [m.fmt(r["values"][m.key]) for m in spec.metrics]
        if paired:
            cells.append(_fmt(r["delta"], first.digits, first.scale, sign=True))
        cells += [_curve(r["history"][key]) for key in spec.history]
        cells += [_epoch(r), _fmt(r["wall_time_s"], 0)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines.append("")
    lines.append(
        "One line per seed; tested epoch: the epoch of the tested checkpoint, of the epochs trained, chosen "
        "on validation unless marked 'no selection' (a recipe that tests its last epoch)."
    )
    if spec.history:
        lines.append(
            f"{', '.join(spec.history)} by epoch: the run's epoch means after epochs 1, 2, ... (its record's "
            "history, or history.json read back from its CSV log by scripts/history_from_csv.py); '?': an "
            "epoch without the value (a resumed run's interrupted epoch); dash: a run recorded without "
            "history."
        )
    if paired:
        names = {row["experiment"]: row["label"] for row in spec.rows}
        bases = [
            f"{row['label']} − {names.get(row['baseline'], row['baseline'])}"
            for row in spec.rows
            if row.get("baseline")
        ]
        lines.append(
            f"Δ: the row's {first.label} minus its base run's at the same seed ({'; '.join(bases)})."
        )
    missing = [r for r in rows if not r["found"]]
    if missing:
        by_row: dict[str, list[int]] = {}
        for r in missing:
            by_row.setdefault(r["experiment"], []).append(r["seed"])
        lines.append(
            "Seeds without a run: "
            + "; ".join(
                f"`{spec.command.format(experiment=e)} seed={','.join(map(str, seeds))}`"
                for e, seeds in by_row.items()
            )
        )
    return "\n".join(lines) + "\n"


def runs_csv(spec: TableSpec, rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    keys = [m.key for m in spec.metrics]
    w.writerow(
        [
            "label",
            "experiment",
            "seed",
            *keys,
            *(f"{key} by epoch" for key in spec.history),
            "delta",
            "tested_epoch",
            "selected",
            "epochs_trained",
            "wall_time_s",
        ]
    )
    for r in rows:
        values = [r["values"][m.key] for m in spec.metrics]
        tested = None if r["tested_epoch"] is None else r["tested_epoch"] + 1
        extra = [r["delta"], tested, float(r["selected"]) if r["found"] else None, r["epochs_trained"]]
        curves = [
            "" if not r["history"][key] else _curve(r["history"][key], sep=";", spec=".6g")
            for key in spec.history
        ]
        w.writerow(
            [r["label"], r["experiment"], r["seed"]]
            + ["" if v is None else f"{v:.6g}" for v in values]
            + curves
            + ["" if v is None else f"{v:.6g}" for v in (*extra, r["wall_time_s"])]
        )
    return buf.getvalue()
