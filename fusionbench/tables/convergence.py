"""Convergence tables and figures from the runs' ``diagnostics.json`` (DEQ paper Table 8, Figs. 3-4).

A table with ``kind: convergence`` lists, per row (experiment), the mean over runs of a trace
(``solver_rel_residual`` or ``iteration_rel_diff``, chosen per row with ``trace``) at the given solver
steps, and draws ``<name>.png`` (geometric mean and 95% interval over runs, computed on log10 values
since the traces span decades) and, where the runs
recorded gate shares, ``<name>_gates.png`` (normalised alpha per modality over steps).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from fusionbench.tables.plotting import save_figure

DASH = "—"


def load_traces(runs: pd.DataFrame, experiment: str) -> list[dict[str, Any]]:
    if runs.empty:
        return []
    out = []
    for path in runs.loc[runs["experiment_name"] == experiment, "path"]:
        f = Path(path) / "diagnostics.json"
        if f.is_file():
            out.append(json.loads(f.read_text()))
    return out


def mean_ci(curves: list[list[float | None]]) -> tuple[list[float], list[float]]:
    """Per-step mean and 95% half-width (normal approximation) over runs, ignoring missing values."""
    means, half = [], []
    for values in zip(*curves):
        v = [x for x in values if x is not None and math.isfinite(x)]
        m = sum(v) / len(v) if v else float("nan")
        sd = (sum((x - m) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else 0.0
        means.append(m)
        half.append(1.96 * sd / len(v) ** 0.5 if v else float("nan"))
    return means, half


def convergence_rows(spec, runs: pd.DataFrame) -> list[dict[str, Any]]:
    rows = []
    for row in spec.rows:
        key = row.get("trace", spec.trace)
        traces = [t[key] for t in load_traces(runs, row["experiment"]) if t.get(key)]
        means, half = mean_ci(traces) if traces else ([], [])
        rows.append(
            {
                **row,
                "key": key,
                "n": len(traces),
                "means": means,
                "half": half,
                "traces": traces,
                "gates": [t["gate_share"] for t in load_traces(runs, row["experiment"]) if "gate_share" in t],
            }
        )
    return rows


def _fmt(v: float | None) -> str:
    return DASH if v is None or not math.isfinite(v) else f"{v:.2e}"


def convergence_markdown(spec, rows: list[dict[str, Any]]) -> str:
    head = ["Method", "trace", "runs"] + [f"step {s}" for s in spec.steps]
    lines = [f"### {spec.title}", ""]
    if spec.caption:
        lines += [spec.caption.strip(), ""]
    lines += [
        "| " + " | ".join(head) + " |",
        "| " + " | ".join(["---", "---"] + ["---:"] * (len(head) - 2)) + " |",
    ]
    for r in rows:
        cells = [r["label"], r["key"], f"{r['n']}/{spec.seeds}"]
        cells += [_fmt(r["means"][s - 1]) if len(r["means"]) >= s else DASH for s in spec.steps]
        lines.append("| " + " | ".join(cells) + " |")
        if r.get("reported"):
            rep = r["reported"]
            lines.append(
                "| "
                + " | ".join(
                    [f"{r['label']} (reported: {spec.reported_source})", r["key"], ""]
                    + [_fmt(rep.get(s)) for s in spec.steps]
                )
                + " |"
            )
    missing = [r for r in rows if r["n"] < spec.seeds]
    lines += [
        "",
        "Batch means on the first test batch of each run, then the arithmetic mean over runs (a few runs "
        "that do not converge dominate it); the figure shows geometric means with 95% intervals.",
    ]
    if missing:
        lines.append(
            "Incomplete rows: "
            + "; ".join(
                f"{r['label']} {r['n']}/{spec.seeds} (`{spec.command.format(experiment=r['experiment'])}`)"
                for r in missing
            )
        )
    return "\n".join(lines) + "\n"


def convergence_figures(spec, rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in rows:
        if not r["means"]:
            continue
        logs = [[math.log10(v) if v is not None and v > 0 else None for v in t] for t in r["traces"]]
        m, h = mean_ci(logs)
        xs = list(range(1, len(m) + 1))
        ax.plot(xs, [10**v for v in m], label=f"{r['label']} (n={r['n']})")
        ax.fill_between(
            xs, [10 ** (v - e) for v, e in zip(m, h)], [10 ** (v + e) for v, e in zip(m, h)], alpha=0.25
        )
    ax.set_yscale("log")
    if not any(r["means"] for r in rows):
        ax.text(0.5, 0.5, "no runs with diagnostics yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("solver step")
    ax.set_ylabel("relative difference / residual")
    ax.set_title(spec.title, fontsize=8)
    if any(r["means"] for r in rows):
        ax.legend(fontsize=7, loc="upper right")
    written.append(save_figure(fig, out_dir / f"{spec.name}.png"))
    gated = [r for r in rows if r["gates"]]
    if gated:
        r = gated[0]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for m in sorted(r["gates"][0]):
            means, _ = mean_ci([g[m] for g in r["gates"]])
            ax.plot(range(1, len(means) + 1), means, label=m)
        ax.set_xlabel("solver step")
        ax.set_ylabel("normalised |alpha|")
        ax.set_title(f"Gate shares per modality: {r['label']} (n={len(r['gates'])})", fontsize=8)
        ax.legend(fontsize=7)
        written.append(save_figure(fig, out_dir / f"{spec.name}_gates.png"))
    return written
