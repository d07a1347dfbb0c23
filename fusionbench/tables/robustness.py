"""Robustness tables (``kind: robustness``): clean metrics plus the areas under the noise curves that
``robustness=<grid>`` writes into every run record (`fusionbench.robustness`).

Per row (one experiment, several seeds): the clean test metrics of ``metrics`` (mean ± std), the raw
area under ``robust_metric`` against the noise level (mean ± std over seeds), the relative area tau
against the ``baseline`` experiment's mean curve (one name, or ``{group: name}``) (Pro-Fusion appendix; sign
flipped for error metrics so that higher = more robust; tau is linear in the curve, so its seed mean is tau of
the mean curve), and tau min-max scaled to [0, 1] across the rows of the same ``group`` that have runs
(the paper's "relative robustness"; the baseline cancels in the scaled value). The caption states the
grid read from the records and the baseline. Rows whose records hold another grid are left out of the
areas and named in the notes. Output: ``<name>.md``, ``.csv`` and ``<name>.png`` (mean curves, one panel
per group).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fusionbench.robustness import auc, lower_is_better, relative_auc, scale_unit
from fusionbench.tables.plotting import save_figure

DASH = "—"


def baseline_of(spec, group: str) -> str:
    """The baseline experiment of a group: ``baseline`` is one name or a ``{group: name}`` mapping."""
    return spec.baseline.get(group, "") if isinstance(spec.baseline, dict) else spec.baseline


def _grid_key(rob: dict[str, Any]) -> tuple:
    seeds = tuple(rob.get("seeds") or [int(rob.get("seed", 0))])
    return tuple(rob["levels"]), tuple(rob["noise"]), seeds, float(rob.get("probability", 1.0))


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def robustness_rows(
    spec, runs: pd.DataFrame
) -> tuple[list[dict[str, Any]], dict[str, Any] | None, list[str]]:
    """(rows, the grid, notes about skipped records)."""
    metric = spec.robust_metric
    grid: dict[str, Any] | None = None
    skipped: list[str] = []
    rows = []
    for row in spec.rows:
        sel = runs[runs["experiment_name"] == row["experiment"]] if len(runs) else runs
        entry: dict[str, Any] = {
            "label": row["label"],
            "experiment": row["experiment"],
            "group": row.get("group", ""),
            "n": len(sel),
            "reported": row.get("reported") or {},
            "curves": [],
            "curve": row.get("curve", spec.curve),  # a row may read another scope (RGB-D: rgb, depth, either)
        }
        scope = entry["curve"]
        for m in spec.metrics:
            vals = pd.to_numeric(sel[m.key], errors="coerce").dropna().tolist() if m.key in sel else []
            entry[m.key] = _mean_std(vals)
        for rob, seed in zip(
            sel.get("robustness", pd.Series(dtype=object)), sel.get("seed", pd.Series(dtype=object))
        ):
            curve = (
                ((rob or {}).get("curves") or {}).get(scope, {}).get("metrics", {}).get(metric)
                if isinstance(rob, dict)
                else None
            )
            if curve is None:
                skipped.append(f"{row['experiment']} seed {seed}: no '{scope}' {metric} curve")
                continue
            if grid is None:
                grid = {
                    "levels": list(rob["levels"]),
                    "noise": list(rob["noise"]),
                    "seed": int(rob.get("seed", 0)),
                    "seeds": list(rob.get("seeds") or []),
                    "probability": rob.get("probability"),
                    "key": _grid_key(rob),
                }
            if _grid_key(rob) != grid["key"]:
                skipped.append(
                    f"{row['experiment']} seed {seed}: another grid ({rob['noise']} at {rob['levels']})"
                )
                continue
            entry["curves"].append([float(v) for v in curve])
        rows.append(entry)
    if grid is None:
        return rows, None, skipped
    levels = grid["levels"]
    for r in rows:
        r["mean_curve"] = np.mean(r["curves"], axis=0).tolist() if r["curves"] else None
        r["auc"] = _mean_std([auc(levels, c) for c in r["curves"]])
    for r in rows:
        base = next(  # the baseline's row in this group (an experiment may appear in several groups)
            (
                b
                for b in sorted(rows, key=lambda b: b["group"] != r["group"])
                if b["experiment"] == baseline_of(spec, r["group"]) and b["curves"]
            ),
            None,
        )
        taus = [relative_auc(levels, c, base["mean_curve"], metric) for c in r["curves"]] if base else []
        r["tau"] = _mean_std(taus)
    for group in dict.fromkeys(r["group"] for r in rows):
        members = {
            i: r["tau"][0] for i, r in enumerate(rows) if r["group"] == group and r["tau"][0] is not None
        }
        for i, v in scale_unit({str(i): v for i, v in members.items()}).items():
            rows[int(i)]["scaled"] = v
    return rows, grid, skipped


def _fmt(value: float | None, digits: int, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    return f"{round(value * scale, digits) + 0.0:.{digits}f}"  # + 0.0: no "-0.000"


def _pm(ms: tuple[float | None, float | None], digits: int, scale: float = 1.0) -> str:
    mean, std = ms
    if mean is None:
        return DASH
    return (
        _fmt(mean, digits, scale)
        if std is None
        else f"{_fmt(mean, digits, scale)} ± {_fmt(std, digits, scale)}"
    )


def _cells(spec, rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    m = spec.robust_metric
    present = {k for r in rows for k in r["reported"]}
    reported_keys = [k for k in [mm.key for mm in spec.metrics] + ["robustness"] if k in present]
    labels = {mm.key: mm.label for mm in spec.metrics} | {"robustness": "robustness"}
    header = ["Method", "group", "runs"] + [mm.label for mm in spec.metrics]
    header += [f"AUC {m}", f"τ vs baseline ({'−' if lower_is_better(m) else '+'}∫Δ{m})", "robustness [0,1]"]
    header += [f"{labels.get(k, k)} (reported)" for k in reported_keys]
    body = []
    for r in rows:
        cells = [r["label"], r["group"], f"{r['n']}/{spec.seeds}"]
        cells += [_pm(r[mm.key], mm.digits, mm.scale) for mm in spec.metrics]
        cells += [
            _pm(r.get("auc", (None, None)), spec.auc_digits),
            _pm(r.get("tau", (None, None)), spec.auc_digits),
            _fmt(r.get("scaled"), 2),
        ]
        cells += [_fmt(r["reported"].get(k), 3) if k in r["reported"] else DASH for k in reported_keys]
        body.append(cells)
    return header, body


def robustness_markdown(
    spec, rows: list[dict[str, Any]], grid: dict[str, Any] | None, skipped: list[str]
) -> str:
    header, body = _cells(spec, rows)
    lines = [f"### {spec.title}", ""]
    if spec.caption:
        lines += [spec.caption.strip(), ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("| " + " | ".join(["---", "---"] + ["---:"] * (len(header) - 2)) + " |")
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in body]
    lines.append("")
    groups = list(dict.fromkeys(r["group"] for r in rows))
    names = {r["experiment"]: f"{r['label']}" for r in rows}
    if isinstance(spec.baseline, dict):
        base_label = ", ".join(
            f"{names.get(baseline_of(spec, g), baseline_of(spec, g))} for {g}" for g in groups
        )
    else:
        base_label = names.get(spec.baseline, spec.baseline)
    if grid:
        scopes = list(dict.fromkeys(r["curve"] for r in rows))
        where = f"the '{scopes[0]}' curve" if len(scopes) == 1 else f"the curves {scopes} (column group)"
        seeds = (
            f"noise seeds {grid['seeds']} (curves averaged)"
            if grid.get("seeds")
            else f"noise seed {grid['seed']}"
        )
        chance = (
            f", each test sample corrupted with probability {grid['probability']}"
            if grid.get("probability")
            else ""
        )
        lines.append(
            f"Grid (from the run records): noise {' + '.join(grid['noise'])} at levels {grid['levels']} on "
            f"{where}, {seeds}{chance}. AUC = trapezoid area of test "
            f"{spec.robust_metric} over the levels; τ = "
            f"{'−' if lower_is_better(spec.robust_metric) else ''}∫(model − baseline) with baseline "
            f"**{base_label}** (mean curve over its seeds); robustness [0,1] = τ min-max scaled across the "
            "rows of the same group with runs."
        )
    else:
        lines.append("No run record holds a robustness curve yet.")
    lines.append("Mean ± sample standard deviation over seeds; `runs` = runs found / seeds expected.")
    if any(r["reported"] for r in rows):
        lines.append(f"Reported columns: the numbers printed in {spec.reported_source}; not measured by us.")
    missing = [r for r in rows if r["n"] < spec.seeds]
    if missing:
        lines.append(
            "Incomplete rows ("
            + ", ".join(f"{r['label']} {r['group']}: {r['n']}/{spec.seeds}".strip() for r in missing)
            + f"); to fill one: `{spec.command}` with its experiment name (column `experiment` of the CSV)."
        )
    if skipped:
        lines.append("Records left out of the areas: " + "; ".join(skipped) + ".")
    return "\n".join(lines) + "\n"


def robustness_csv(spec, rows: list[dict[str, Any]], grid: dict[str, Any] | None) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    levels = grid["levels"] if grid else []
    head = ["label", "group", "experiment", "runs", "seeds_expected"]
    for m in spec.metrics:
        head += [f"{m.key}:mean", f"{m.key}:std", f"{m.key}:reported"]
    head += ["auc:mean", "auc:std", "tau:mean", "tau:std", "robustness_scaled", "robustness:reported"]
    head += [f"{spec.robust_metric}@{lv:g}" for lv in levels]
    w.writerow(head)

    def g(v: float | None) -> str:
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6g}"

    for r in rows:
        line = [r["label"], r["group"], r["experiment"], r["n"], spec.seeds]
        for m in spec.metrics:
            line += [g(r[m.key][0]), g(r[m.key][1]), g(r["reported"].get(m.key))]
        auc_ms, tau_ms = r.get("auc", (None, None)), r.get("tau", (None, None))
        line += [
            g(auc_ms[0]),
            g(auc_ms[1]),
            g(tau_ms[0]),
            g(tau_ms[1]),
            g(r.get("scaled")),
            g(r["reported"].get("robustness")),
        ]
        curve = r.get("mean_curve") or [None] * len(levels)
        line += [g(v) for v in curve]
        w.writerow(line)
    return buf.getvalue()


def robustness_figure(spec, rows: list[dict[str, Any]], grid: dict[str, Any] | None, out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(r["group"] for r in rows))
    models = list(
        dict.fromkeys(r["label"].removeprefix("Pro-") for r in rows)
    )  # a model and its Pro- version share a colour
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
    for ax, group in zip(axes[0], groups):
        drawn = False
        for r in rows:
            if r["group"] != group or not r.get("mean_curve"):
                continue
            drawn = True
            style = "--" if r["label"].startswith("Pro-") else "-"
            color = f"C{models.index(r['label'].removeprefix('Pro-')) % 10}"
            ax.plot(
                grid["levels"],
                r["mean_curve"],
                style,
                color=color,
                marker="o",
                ms=3,
                label=f"{r['label']} ({len(r['curves'])})",
            )
        if drawn:
            ax.legend(fontsize=6)
        else:
            ax.text(0.5, 0.5, "no runs yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(group or spec.title, fontsize=8)
        ax.set_xlabel("noise level")
        ax.set_ylabel(f"test {spec.robust_metric}")
    fig.suptitle(spec.title, fontsize=8)
    return save_figure(fig, out_dir / f"{spec.name}.png")


__all__ = ["robustness_csv", "robustness_figure", "robustness_markdown", "robustness_rows"]
