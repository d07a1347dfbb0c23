"""Training curves of DEQ fusion runs side by side (loss, forward residual, solver steps, backward check).

    python scripts/plot_deq_curves.py before_seed1=/tmp/before/csv/metrics.csv \
        after_seed1=logs/runs/X/csv/metrics.csv \
        --out results/deq_training_curves.png --keep results/deq_curves

Each argument is LABEL=PATH to a Lightning CSV log (``logger=csv``) or to a compact CSV written earlier by
``--keep``. The per-epoch columns are reduced to one row per epoch; ``--keep`` saves those compact CSVs so the
figure can be redrawn from committed files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from fusionbench.tables.plotting import save_figure

COLUMNS = {  # compact name: Lightning log column
    "train_loss": "train/loss",
    "val_loss": "val/loss",
    "val_acc": "val/acc",
    "f_rel_residual": "train/deq/rel_residual",
    "f_steps": "train/deq/nstep",
    "b_converged": "train/deq/b_converged",
}
PANELS = [
    ("train_loss", "training loss"),
    ("val_loss", "validation loss"),
    ("f_rel_residual", "forward relative residual (train)"),
    ("f_steps", "forward solver steps (train)"),
    ("b_converged", "backward solves passing the check"),
    ("val_acc", "validation accuracy"),
]


def per_epoch(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path)
    if "train_loss" in frame:  # already compact
        return frame.set_index("epoch")
    cols = {k: v for k, v in COLUMNS.items() if v in frame}
    return frame.groupby("epoch")[list(cols.values())].mean().rename(columns={v: k for k, v in cols.items()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="LABEL=PATH")
    p.add_argument("--out", required=True)
    p.add_argument("--keep", help="folder for compact per-epoch CSVs")
    p.add_argument("--title", default="DEQ fusion on ROSMAP, baselines recipe, early stopping off")
    args = p.parse_args()
    import matplotlib.pyplot as plt

    curves = {}
    for item in args.runs:
        label, sep, path = item.partition("=")
        if not sep or not label:
            p.error(f"{item!r} is not LABEL=PATH (e.g. after_seed1=logs/runs/X/csv/metrics.csv)")
        if not Path(path).is_file():
            p.error(
                f"{path} does not exist: give a Lightning CSV log (a run with logger=csv) or a compact CSV "
                "from --keep"
            )
        curves[label] = per_epoch(Path(path))
        if args.keep:
            Path(args.keep).mkdir(parents=True, exist_ok=True)
            curves[label].round(6).to_csv(Path(args.keep) / f"{label}.csv")
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    colours = {label: f"C{i}" for i, label in enumerate(curves)}  # a run keeps its colour in every panel
    for ax, (key, title) in zip(axes.flat, PANELS):
        for label, frame in curves.items():
            if key in frame:
                ax.plot(
                    frame.index,
                    frame[key],
                    label=label,
                    lw=1.1,
                    color=colours[label],
                    ls="--" if label.startswith("before") else "-",
                )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        if key == "f_rel_residual":
            ax.set_yscale("log")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(args.title)
    save_figure(fig, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
