"""Accuracy-compute trade-off figures of a metrics table (DynMM Figures 4-5).

A metrics table with a ``tradeoff`` block gets ``<name>.png`` next to its .md/.csv/.tex, two panels:

- (a) the task metric ``y`` against the compute per sample ``x`` (e.g. ``test/dynmm/madds``, DynMM's
  expected MAdds per test sample; rows without it, such as static experts, use ``x_fallback``, e.g. the
  record's ``madds``): rows with a ``lambda`` form one line in λ order, annotated with λ; other rows
  (static experts, soft gating) are single markers;
- (b) each expert's share of the test samples (``shares: {metric key: label}``) against λ, for the rows
  with a ``lambda``; the λ axis is symmetric-log so that λ = 0 sits on it.

Points are mean ± sample std over seeds in both directions, from the same aggregation as the table.
Every key named in the block must be one of the table's ``metrics`` (so the numbers drawn are the
numbers printed). Block::

    tradeoff: {x: test/dynmm/madds, x_fallback: madds, x_label: "MAdds per sample (M)", x_scale: 1.0e-6,
               y: test/acc, y_label: "accuracy (%)", y_scale: 100,
               shares: {test/dynmm/share_uni: image only, test/dynmm/share_late: late fusion}}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fusionbench.tables.plotting import save_figure

KEYS = ("x", "x_fallback", "x_label", "x_scale", "y", "y_label", "y_scale", "shares", "linthresh")


def check_tradeoff(
    block: dict[str, Any], metric_keys: list[str], rows: list[dict[str, Any]], where: str
) -> None:
    unknown = sorted(set(block) - set(KEYS))
    if unknown:
        raise ValueError(f"{where}: tradeoff has unknown keys {unknown}; allowed: {list(KEYS)}")
    if not block.get("x") or not block.get("y"):
        raise ValueError(f"{where}: tradeoff needs `x` (compute key) and `y` (metric key)")
    named = [
        block["x"],
        block["y"],
        *([block["x_fallback"]] if block.get("x_fallback") else []),
        *block.get("shares", {}),
    ]
    missing = [k for k in named if k not in metric_keys]
    if missing:
        raise ValueError(
            f"{where}: tradeoff keys {missing} are not among the table's metrics; add them to `metrics`"
        )
    bad = [r["label"] for r in rows if "lambda" in r and not isinstance(r["lambda"], (int, float))]
    if bad:
        raise ValueError(f"{where}: rows {bad} have a non-numeric `lambda`")


def _point(row: dict[str, Any], key: str, fallback: str | None) -> tuple[float | None, float | None]:
    mean, std = row.get(key, (None, None))
    if mean is None and fallback:
        mean, std = row.get(fallback, (None, None))
    return mean, std


def tradeoff_points(spec, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per table row with runs: label, lambda (or None), x/y mean and std (scaled), shares (mean, std)."""
    t = spec.tradeoff
    lam = {r["label"]: r.get("lambda") for r in spec.rows}
    out = []
    for r in rows:
        (x, xs), (y, ys) = _point(r, t["x"], t.get("x_fallback")), _point(r, t["y"], None)
        if x is None or y is None:
            continue
        sx, sy = float(t.get("x_scale", 1.0)), float(t.get("y_scale", 1.0))
        out.append(
            {
                "label": r["label"],
                "lambda": lam.get(r["label"]),
                "x": x * sx,
                "x_std": (xs or 0.0) * sx,
                "y": y * sy,
                "y_std": (ys or 0.0) * sy,
                "shares": {k: r.get(k, (None, None)) for k in t.get("shares", {})},
            }
        )
    return out


def tradeoff_figure(spec, rows: list[dict[str, Any]], out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = spec.tradeoff
    points = tradeoff_points(spec, rows)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
    swept = sorted((p for p in points if p["lambda"] is not None), key=lambda p: p["lambda"])
    if swept:
        ax.errorbar(
            [p["x"] for p in swept],
            [p["y"] for p in swept],
            xerr=[p["x_std"] for p in swept],
            yerr=[p["y_std"] for p in swept],
            marker="o",
            capsize=3,
            color="C0",
            label="DynMM (λ sweep)",
        )
        for p in swept:
            ax.annotate(
                f"λ={p['lambda']:g}", (p["x"], p["y"]), textcoords="offset points", xytext=(4, 4), fontsize=6
            )
    markers = iter("sD^vP*X")
    for i, p in enumerate(p for p in points if p["lambda"] is None):
        ax.errorbar(
            [p["x"]],
            [p["y"]],
            xerr=[p["x_std"]],
            yerr=[p["y_std"]],
            marker=next(markers, "o"),
            capsize=3,
            linestyle="none",
            color=f"C{i + 1}",
            label=p["label"],
        )
    if not points:
        ax.text(0.5, 0.5, "no runs yet", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=6)
    ax.set_xlabel(t.get("x_label", t["x"]))
    ax.set_ylabel(t.get("y_label", t["y"]))
    ax.set_title("(a) metric against compute per sample", fontsize=8)

    drawn = False
    for j, (key, label) in enumerate(t.get("shares", {}).items()):
        pts = [(p["lambda"], *p["shares"][key]) for p in swept if p["shares"][key][0] is not None]
        if pts:
            drawn = True
            bx.errorbar(
                [a for a, _, _ in pts],
                [m for _, m, _ in pts],
                yerr=[s or 0.0 for _, _, s in pts],
                marker="o",
                capsize=3,
                color=f"C{j}",
                label=label,
            )
    bx.set_xscale("symlog", linthresh=float(t.get("linthresh", 0.01)))
    bx.set_ylim(-0.05, 1.05)
    if drawn:
        bx.legend(fontsize=6)
    else:
        bx.text(0.5, 0.5, "no runs yet", ha="center", va="center", transform=bx.transAxes)
    bx.set_xlabel("λ (resource weight)")
    bx.set_ylabel("share of test samples")
    bx.set_title("(b) expert share against λ", fontsize=8)
    fig.suptitle(spec.title, fontsize=8)
    return save_figure(fig, out_dir / f"{spec.name}.png")


__all__ = ["check_tradeoff", "tradeoff_figure", "tradeoff_points"]
