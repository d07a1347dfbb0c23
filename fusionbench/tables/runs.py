"""Run-by-run tables (``kind: runs``): one line per row and expected seed instead of a mean.

For rows whose seeds disagree more than a mean ± std can say (a model that learns a constant at some
seeds and not at others): each seed's metrics, the epoch its tested checkpoint is from (``k of n``, from
the record's ``best_val``) and its wall time. A row with ``baseline: <experiment>`` adds the difference of
the first metric to that experiment's run of the same seed (Pro-Fusion minus its base, paired). A seed
without a run keeps its line, with dashes and the command that makes it.
"""

from __future__ import annotations

import csv
import io
import math
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
            entry: dict[str, Any] = {
                "label": row["label"],
                "experiment": row["experiment"],
                "seed": seed,
                "found": bool(len(sel)),
                "values": {m.key: _value(sel, m.key) for m in spec.metrics},
                "best_epoch": _value(sel, "best_epoch"),
                "epochs_trained": _value(sel, "epochs_trained"),
                "wall_time_s": _value(sel, "wall_time_s"),
                "delta": None,
            }
            if row.get("baseline") and entry["values"][first] is not None:
                base = _value(_run(runs, row["baseline"], seed), first)
                entry["delta"] = None if base is None else entry["values"][first] - base
            out.append(entry)
    return out


def _epoch(r: dict[str, Any]) -> str:
    if r["best_epoch"] is None:
        return DASH
    selected = f"{int(r['best_epoch']) + 1}"  # records count epochs from 0
    return selected if r["epochs_trained"] is None else f"{selected} of {int(r['epochs_trained'])}"


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
    head += ["selected epoch", "s/run"]
    lines = [f"### {spec.title}", ""]
    if spec.caption:
        lines += [spec.caption.strip(), ""]
    lines += ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |"]
    for r in rows:
        cells = [r["label"], str(r["seed"])] + [m.fmt(r["values"][m.key]) for m in spec.metrics]
        if paired:
            cells.append(_fmt(r["delta"], first.digits, first.scale, sign=True))
        cells += [_epoch(r), _fmt(r["wall_time_s"], 0)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines.append("")
    lines.append(
        "One line per seed; selected epoch: the epoch of the tested checkpoint (chosen on validation), of "
        "the epochs trained."
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
    w.writerow(["label", "experiment", "seed", *keys, "delta", "best_epoch", "epochs_trained", "wall_time_s"])
    for r in rows:
        values = [r["values"][m.key] for m in spec.metrics]
        extra = [r["delta"], None if r["best_epoch"] is None else r["best_epoch"] + 1, r["epochs_trained"]]
        w.writerow(
            [r["label"], r["experiment"], r["seed"]]
            + ["" if v is None else f"{v:.6g}" for v in (*values, *extra, r["wall_time_s"])]
        )
    return buf.getvalue()
