"""Reference predictors for the stock volatility task of Pro-Fusion Table 4, and a scale check of runs.

Per sector, on the test windows of its dataset config (the target stock's next squared log return,
normalised by the training targets' std, as the models see it):

- constant: the training targets' mean, what a model that learned nothing predicts;
- copy-last: the last input day's squared return (MultiBench's copy-last baseline);
- k-day mean: the mean squared return of the last k input days (historical volatility).

For each run folder given with ``--runs``: the test predictions of its selected checkpoint (MSE,
Pearson r, their spread over the windows) and how far they move when every input window is multiplied by
``--scale``; with ``--init`` also the same model as built from the run's config before training (seeded).
Volatility is the scale of the returns, so a model that can predict it must answer a scaled window with
another prediction.

    python scripts/stock_baselines.py --out results/pro_t4_baselines.md
    python scripts/stock_baselines.py --init --runs results/runs/pro_t4_fnb_eftransf_base/seed=0 --out ...
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import hydra
import torch

import fusionbench.train  # noqa: F401  (registers the config resolvers)
from fusionbench.errors import ConfigError
from fusionbench.runs import load_run, run_config
from fusionbench.train import build

CONSTANT = "constant (training mean)"
SECTORS = {"F&B": "stocks", "HEALTH": "stocks_health", "TECH": "stocks_tech"}
DEFAULT_DAYS = [5, 20, 100]
DEFAULT_SCALE = 2.0


def dataset(config: str):
    from hydra import compose, initialize_config_dir

    from fusionbench import ROOT

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"dataset={config}", "paths.output_dir=/tmp/fusionbench_baselines"])
    dm = hydra.utils.instantiate(cfg.dataset)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))


def references(dm, ks: list[int]) -> dict[str, tuple[float, float]]:
    """``{predictor: (test MSE, Pearson r)}``; ``target[s - 1]`` is window s's last day squared."""
    target = dm.train_set.target
    starts = torch.tensor(list(dm.test_set.starts))
    if ks and max(ks) > int(starts.min()):
        # target[s - k : s] would wrap around to the end of the series and average the wrong days
        raise ValueError(
            f"a {max(ks)}-day mean needs {max(ks)} earlier days, but the first test window has only "
            f"{int(starts.min())}; pass smaller --days"
        )
    y = target[starts]
    preds = {
        CONSTANT: target[torch.tensor(list(dm.train_set.starts))].mean().expand_as(y),
        "copy-last": target[starts - 1],
    }
    for k in ks:
        preds[f"{k}-day mean"] = torch.stack([target[s - k : s].mean() for s in starts.tolist()])
    return {
        name: (float(((p - y) ** 2).mean()), pearson(p, y) if name != CONSTANT else float("nan"))
        for name, p in preds.items()
    }


@torch.no_grad()
def scale_check(run: Path, scale: float, init: bool = False) -> dict[str, float]:
    if init:
        cfg = run_config(run)
        torch.manual_seed(int(cfg.seed))
        dm, task = build(cfg)
    else:
        _, dm, task = load_run(run)
    dm.setup("test")
    model = task.model.eval()
    preds, scaled, ys = [], [], []
    for batch in dm.test_dataloader():
        x = batch["inputs"]
        preds.append(model(x).logits.flatten())
        scaled.append(model({m: v * scale for m, v in x.items()}).logits.flatten())
        ys.append(batch["target"].flatten())
    p, q, y = torch.cat(preds), torch.cat(scaled), torch.cat(ys)
    return {
        "mse": float(((p - y) ** 2).mean()),
        "r": pearson(p, y),
        "pred_std": float(p.std()),
        "moved": float((q - p).abs().mean()),
    }


def reproduce_command(args: argparse.Namespace) -> str:
    """The command line that regenerates this report: every option that is not at its default."""
    parts = ["python scripts/stock_baselines.py"]
    if list(args.sectors) != list(SECTORS):
        parts.append("--sectors " + " ".join(map(shlex.quote, args.sectors)))  # F&B needs quotes in a shell
    if list(args.days) != DEFAULT_DAYS:
        parts.append("--days " + " ".join(map(str, args.days)))
    if args.scale != DEFAULT_SCALE:
        parts.append(f"--scale {args.scale:g}")
    if args.init:
        parts.append("--init")
    if args.runs:
        parts.append("--runs " + " ".join(shlex.quote(str(run)) for run in args.runs))
    return " ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sectors", nargs="+", default=list(SECTORS), choices=list(SECTORS))
    ap.add_argument("--days", type=int, nargs="+", default=DEFAULT_DAYS, help="k of the k-day means")
    ap.add_argument("--runs", type=Path, nargs="*", default=[], help="run folders to scale-check")
    ap.add_argument("--scale", type=float, default=DEFAULT_SCALE)
    ap.add_argument("--init", action="store_true", help="also check each run's model before training")
    ap.add_argument("--out", type=Path, help="write the Markdown here too")
    args = ap.parse_args()
    for run in args.runs:  # a wrong path fails before minutes of reference computations, not as a traceback
        try:
            run_config(run)
        except ConfigError as e:
            sys.exit(f"stock_baselines: {e}")

    command = reproduce_command(args)
    lines = [
        "# Pro-Fusion Table 4: reference predictors on the stock snapshot",
        "",
        "Test windows of each sector (targets normalised by the training targets' std, as in pro_t4_stocks);",
        f"`{command.strip()}`.",
        "",
        "| sector | predictor | test MSE | Pearson r |",
        "| --- | --- | ---: | ---: |",
    ]
    for sector in args.sectors:
        try:
            refs = references(dataset(SECTORS[sector]), args.days)
        except ValueError as e:
            sys.exit(f"stock_baselines: {sector}: {e}")
        for name, (mse, r) in refs.items():
            lines.append(f"| {sector} | {name} | {mse:.3f} | {'—' if r != r else f'{r:.3f}'} |")
    if args.runs:
        lines += [
            "",
            "Predictions of each run on the test windows (trained: its selected checkpoint; init: the same",
            "model before training; checkpoints are not committed: trained rows need a local run), and how",
            f"far they move when every input window is multiplied by {args.scale:g}:",
            "",
            "| run | model | test MSE | Pearson r | std over windows | "
            f"mean abs change, inputs x {args.scale:g} |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for run in args.runs:
            for init in [False, True] if args.init else [False]:
                try:
                    c = scale_check(run, args.scale, init)
                except ConfigError:  # checkpoints are not committed: the init row still tells
                    lines.append(f"| {run} | trained | no checkpoint kept | | | |")
                    continue
                lines.append(
                    f"| {run} | {'init' if init else 'trained'} | {c['mse']:.3f} | {c['r']:.3f} | "
                    f"{c['pred_std']:.4f} | {c['moved']:.4f} |"
                )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
