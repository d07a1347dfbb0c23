"""Curve tables: a metric against a swept setting (Pro-Fusion Figures 4, 5, 7, 9), one line per row.

A table with ``kind: curve`` has ``x: {label, values}`` and rows whose ``experiment`` is a pattern
with ``{x}`` (each swept value is its own experiment name, e.g. ``pro_fig4_lattice_late_h{x}``), except
the values of a row's ``reuse: {x: experiment}``, points whose configuration is another table's row.
With ``improvement: true`` a row also names a ``baseline`` pattern and the cell is the per-seed
relative improvement ``100 (baseline - run) / |baseline|`` (for a lower-is-better metric; set
``higher_is_better: true`` to flip the sign), paired by seed so that a trial's base and Pro-Fusion runs
share their data. With ``artifact: <file>`` the values come instead from a JSON file in each run folder
(``<file>[row.series][x]``, e.g. the linear probes of ``scripts/linear_probe.py``), and ``experiment``
is a plain name. Cells are mean ± sample std over seeds with the runs found; missing points stay
dashes and the notes give the command that fills them. A row with ``at: [x, ...]`` has only those points
(e.g. a base model's probe, which has one step); its other cells read n/a and are not missing.
Output: ``<name>.md``, ``.csv``, ``.png``.
"""

from __future__ import annotations

import csv
import io
import json
import textwrap
from pathlib import Path
from typing import Any

import pandas as pd

from fusionbench.tables.plotting import save_figure

DASH = "—"
NA = "n/a"


def point_experiment(row: dict[str, Any], x: Any, pattern: str = "experiment") -> str:
    """The experiment of a curve row at ``x``: its ``reuse`` entry, else its pattern with ``{x}`` filled."""
    if pattern == "experiment" and x in (row.get("reuse") or {}):
        return row["reuse"][x]
    return row[pattern].format(x=x)


def _values(runs: pd.DataFrame, experiment: str, key: str) -> dict[int, float]:
    if runs.empty or key not in runs:
        return {}
    sel = runs[runs["experiment_name"] == experiment]
    return {
        int(s): float(v) for s, v in zip(sel["seed"], pd.to_numeric(sel[key], errors="coerce")) if pd.notna(v)
    }


def _artifact_values(
    runs: pd.DataFrame, experiment: str, artifact: str, series: str, x: Any
) -> dict[int, float]:
    """Per seed, ``<run>/<artifact>[series][x]`` (e.g. linear_probe.json: modality -> step -> accuracy)."""
    if runs.empty:
        return {}
    out = {}
    for seed, path in runs.loc[runs["experiment_name"] == experiment, ["seed", "path"]].itertuples(
        index=False
    ):
        f = Path(path) / artifact
        if f.is_file():
            value = json.loads(f.read_text()).get(series, {}).get(str(x))
            if value is not None:
                out[int(seed)] = float(value)
    return out


def curve_rows(spec, runs: pd.DataFrame) -> list[dict[str, Any]]:
    key = spec.metrics[0].key
    out = []
    for row in spec.rows:
        points = []
        for x in spec.x["values"]:
            if x not in row.get("at", spec.x["values"]):
                points.append({"x": x, "n": 0, "mean": None, "std": None, "na": True})
                continue
            if spec.artifact:
                vals = _artifact_values(runs, row["experiment"], spec.artifact, row["series"], x)
            else:
                vals = _values(runs, point_experiment(row, x), key)
            if spec.improvement:
                base = _values(runs, point_experiment(row, x, "baseline"), key)
                sign = -1.0 if spec.higher_is_better else 1.0
                vals = {
                    s: sign * 100.0 * (base[s] - v) / abs(base[s])
                    for s, v in vals.items()
                    if s in base and base[s] != 0
                }
            v = list(vals.values())
            mean = sum(v) / len(v) if v else None
            std = (sum((a - mean) ** 2 for a in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else None
            points.append({"x": x, "n": len(v), "mean": mean, "std": std})
        out.append({**row, "points": points})
    return out


def _cell(metric, p: dict[str, Any], seeds: int, improvement: bool) -> str:
    if p.get("na"):
        return NA
    if p["mean"] is None:
        return f"{DASH} (0/{seeds})"
    fmt = (lambda v: f"{v:+.1f}") if improvement else metric.fmt
    std = "" if p["std"] is None else f" ± {fmt(p['std']).lstrip('+')}"
    return f"{fmt(p['mean'])}{std} ({p['n']}/{seeds})"


def curve_markdown(spec, rows: list[dict[str, Any]]) -> str:
    metric = spec.metrics[0]
    what = f"% improvement in {metric.label} over the baseline" if spec.improvement else metric.label
    head = [spec.x.get("label", "x") + " →"] + [str(x) for x in spec.x["values"]]
    lines = [f"### {spec.title}", ""]
    if spec.caption:
        lines += [spec.caption.strip(), ""]
    lines += ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |"]
    for r in rows:
        lines.append(
            "| "
            + " | ".join([r["label"]] + [_cell(metric, p, spec.seeds, spec.improvement) for p in r["points"]])
            + " |"
        )
        if r.get("reported"):
            rep = r["reported"]
            lines.append(
                "| "
                + " | ".join(
                    [f"{r['label']} (reported)"]
                    + [metric.fmt(rep.get(x)) if x in rep else DASH for x in spec.x["values"]]
                )
                + " |"
            )
    lines += ["", f"Cells: {what}, mean ± sample std over seeds (runs found / seeds expected)."]
    if spec.has_reported:
        lines.append(f"Reported rows: read from {spec.reported_source}; not measured by us.")
    if any(p.get("na") for r in rows for p in r["points"]):
        lines.append(f"{NA}: the row has no such point.")
    points = [p for r in rows for p in r["points"] if not p.get("na")]
    missing = [p for p in points if p["n"] < spec.seeds]
    if missing:
        lines.append(
            f"{len(missing)} of {len(points)} points have fewer runs than expected; "
            f"to fill them: `{spec.command}`"
        )
    return "\n".join(lines) + "\n"


def curve_csv(spec, rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        [
            "label",
            "experiment",
            "x",
            "runs",
            "seeds_expected",
            f"{spec.metrics[0].key}:{'improvement_pct' if spec.improvement else 'mean'}",
            "std",
        ]
    )
    for r in rows:
        for p in (p for p in r["points"] if not p.get("na")):
            w.writerow(
                [
                    r["label"],
                    r["experiment"] if spec.artifact else point_experiment(r, p["x"]),
                    p["x"],
                    p["n"],
                    spec.seeds,
                    "" if p["mean"] is None else f"{p['mean']:.6g}",
                    "" if p["std"] is None else f"{p['std']:.6g}",
                ]
            )
    return buf.getvalue()


def curve_figure(spec, rows: list[dict[str, Any]], out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = spec.metrics[0]
    many = (
        len(rows) > 8
    )  # e.g. Figure 13's probe rows: a wider figure, 20 colours, the legend beside the axes
    fig, ax = plt.subplots(figsize=(9, 4.5) if many else (5, 3.5))
    colors = plt.get_cmap("tab20").colors if many else [None]
    labels = [str(x) for x in spec.x["values"]]
    numeric = all(isinstance(x, (int, float)) for x in spec.x["values"])
    positions = list(spec.x["values"]) if numeric else list(range(len(labels)))
    scale = 1.0 if spec.improvement else metric.scale
    drawn = False
    for i, r in enumerate(rows):
        pts = [(pos, p) for pos, p in zip(positions, r["points"]) if p["mean"] is not None]
        if not pts:
            continue
        drawn = True
        ax.errorbar(
            [pos for pos, _ in pts],
            [p["mean"] * scale for _, p in pts],
            yerr=[(p["std"] or 0.0) * scale for _, p in pts],
            marker="osD^v"[i // len(colors) % 5],
            color=colors[i % len(colors)],
            capsize=3,
            label=r["label"],
        )
    if numeric and spec.x.get("log"):
        ax.set_xscale("log", base=2)
    ax.set_xticks(positions, labels)  # the swept values only (no 1.2, 1.4 between unroll steps 1 and 2)
    if spec.improvement:
        ax.axhline(0.0, color="grey", lw=0.8)
    if not drawn:
        ax.text(0.5, 0.5, "no runs yet", ha="center", va="center", transform=ax.transAxes)
    elif many:
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=7)
    ax.set_xlabel(spec.x.get("label", "x"))
    ax.set_ylabel(f"% improvement ({metric.label})" if spec.improvement else metric.label)
    ax.set_title(textwrap.fill(spec.title, 90 if many else 60), fontsize=8)
    return save_figure(fig, out_dir / f"{spec.name}.png")
