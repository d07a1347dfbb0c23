"""Ordinary least squares on [X_1; X_2] (with an intercept) for Pro-Fusion's generative model: the test MSE a
plain linear regression reaches on the same samples as the Figure 7 runs (same seeds, same 4,000 training and
2,000 test samples of fusionbench/data/generative.py), a reference for what the fusion MLPs learn.

    python scripts/generative_ols.py --eta 0 2 --sigma2 0.1 --seeds 0-29
"""

from __future__ import annotations

import argparse
import statistics

import torch

from fusionbench.data import GenerativeDataModule


def ols_test_mse(eta: float, sigma2: float, seed: int) -> float:
    dm = GenerativeDataModule(eta=eta, sigma2=sigma2, seed=seed)
    dm._load()

    def design(ds) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([ds.inputs["x1"], ds.inputs["x2"]], dim=1).double()
        return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1), ds.target.double()

    (a, y), (b, y_test) = design(dm.train_set), design(dm.test_set)
    w = torch.linalg.lstsq(a, y).solution
    return float(((b @ w - y_test) ** 2).mean())


def seed_range(text: str) -> range:
    """``first-last`` (inclusive), e.g. ``0-29``."""
    first, sep, last = text.partition("-")
    if not (sep and first.isdigit() and last.isdigit() and int(first) <= int(last)):
        raise argparse.ArgumentTypeError(f"--seeds takes first-last, e.g. 0-29; got {text!r}")
    return range(int(first), int(last) + 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eta", type=float, nargs="+", default=[0.0, 2.0])
    p.add_argument("--sigma2", type=float, default=0.1)
    p.add_argument("--seeds", type=seed_range, default=range(0, 10), help="first-last (default 0-9)")
    args = p.parse_args()
    lo, hi = args.seeds[0], args.seeds[-1]
    for eta in args.eta:
        mse = [ols_test_mse(eta, args.sigma2, s) for s in args.seeds]
        print(
            f"eta={eta:g} sigma2={args.sigma2:g} seeds {lo}-{hi}: "
            f"OLS test MSE mean {statistics.mean(mse):.2f}  " + " ".join(f"{m:.2f}" for m in mse)
        )


if __name__ == "__main__":
    main()
