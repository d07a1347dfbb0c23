"""Robustness evaluation: the test split under a declared grid of input corruptions.

A grid (``configs/robustness/*.yaml``) names noise types applied together at one level ``p``, the
levels, and the scopes: ``all`` corrupts every modality at once, ``each`` one modality at a time
(a curve per modality), a modality name that modality alone, and ``either`` one modality per sample
drawn at random (below). Noise types (MultiBench's time-series noises plus relative Gaussians for
images and features), applied per sample in the order listed:

| name | effect at level p |
| --- | --- |
| ``white`` | ``x + p * eps``, eps ~ N(0, 1) (MultiBench ``white_noise``; p is an absolute std) |
| ``gaussian`` | ``x + p * s_m * eps`` with ``s_m`` the std of modality m on the clean test split |
| ``gaussian_mean_abs`` | ``x + p * mean(|x|) * eps``, the mean over the sample's values (DynMM's RGB-D) |
| ``feature_drop`` | every value set to 0 with probability p (MultiBench ``random_drop``) |
| ``timestep_drop`` | each time step (axis 0, all features) zeroed with probability p (``structured_drop``) |

Noise is drawn from a generator seeded by ``(grid seed, level index, scope, sample index)``, so a
curve does not depend on the batch size or the model, and two models of a table see the same
corrupted inputs. The datamodule decides *where* corruption happens (`FusionDataModule.robustness_set`):
on the sample the model receives, or earlier where the dataset has a per-sample transform (stocks:
before MultiBench's quantisation, as MultiBench corrupts the raw windows).

Optional grid keys (DynMM's NYUv2 protocol, ``FusionDynMM/eval.py``; ``configs/robustness/rgbd.yaml``):

- ``probability`` q (default 1): a sample of a corrupted scope is corrupted with probability q, from one
  uniform draw u per sample (u < q). Scope ``either`` with modalities m_0 < m_1 < ... (sorted) corrupts
  m_i when q*i <= u < q*(i+1) and nothing when u >= q*M (q = 0.33 on rgb/depth: rgb 33 %, depth 33 %,
  clean 34 %, the public ``--mode 2``); it needs q*M <= 1.
- ``seeds`` (a list): every point is evaluated once per noise seed; the curve holds the mean over seeds,
  with ``std`` (population std, ``np.std`` as the public script) and ``per_seed`` alongside. Level 0 is
  the clean split, evaluated once and shared by every seed.

Known difference from the public script: it draws u and takes ``mean(|x|)`` once per *batch* (all 8
images of a batch corrupted or none, the scale pooled over the batch) from the global torch RNG; here
both are per sample from the seeded generators above, so a curve does not depend on the batch size or
the loader order. The expected share of corrupted images is the same; an image's noise scale differs from
the public one only by how far its own mean |x| lies from its batch's.

Areas (Pro-Fusion appendix "Robustness Computation", after Taori et al. 2020):

- raw AUC: the trapezoid area under metric-versus-level, ``auc(levels, perf)``;
- relative robustness ``tau(f) = +/- integral (Perf(f, s) - Perf(b, s)) ds`` against a baseline model b,
  sign flipped for error metrics (``relative_auc``), then min-max scaled to [0, 1] across the models
  compared in one table (``scale_unit``). After scaling, the baseline cancels: tau(f) - tau(g) does not
  depend on b, so scaled values depend only on the compared set.

A debug run's test limit (``fast_dev_run``, ``limit_test_batches``: ``batch_limit``) also limits every
point of the grid to its first batches, so ``debug=fdr`` stays a smoke run; the record's
``limit_batches`` then says the curves are partial.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fusionbench.errors import ConfigError
from fusionbench.metrics import make_metrics, prepare_for_metrics

log = logging.getLogger("fusionbench")

NOISES = ("white", "gaussian", "gaussian_mean_abs", "feature_drop", "timestep_drop")
SCOPES = ("all", "each", "either")
ERROR_METRICS = ("mse", "mae", "loss")  # lower is better: robustness signs are flipped


def white_noise(x: torch.Tensor, level: float, g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return x + (level * scale) * torch.randn(x.shape, generator=g, dtype=x.dtype)


def mean_abs_noise(x: torch.Tensor, level: float, g: torch.Generator) -> torch.Tensor:
    """``x + level * mean(|x|) * eps``: DynMM's RGB-D noise, scaled by this sample's mean magnitude."""
    return white_noise(x, level, g, float(x.abs().mean()))


def feature_drop(x: torch.Tensor, level: float, g: torch.Generator) -> torch.Tensor:
    return x * (torch.rand(x.shape, generator=g) >= level).to(x.dtype)


def timestep_drop(x: torch.Tensor, level: float, g: torch.Generator) -> torch.Tensor:
    keep = torch.rand(x.shape[:1], generator=g) >= level
    return x * keep.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)


@dataclass
class Corruption:
    """One point of a grid: ``noises`` at ``level`` on ``modalities``; called per sample as
    ``corruption(inputs, index)`` (``inputs`` maps modality -> one sample's tensor).

    ``probability`` < 1 corrupts a sample only when its uniform draw u < probability; ``either`` corrupts
    one of ``modalities`` (sorted) per sample, the i-th when probability*i <= u < probability*(i+1)."""

    noises: Sequence[str]
    level: float
    modalities: Sequence[str]
    seed: int = 0
    scales: Mapping[str, float] = field(default_factory=dict)  # per-modality std for ``gaussian``
    probability: float = 1.0
    either: bool = False

    def chosen(self, u: float) -> list[str]:
        """The modalities corrupted for a sample whose uniform draw is ``u``."""
        if self.either:
            mods = sorted(self.modalities)
            return next(([m] for i, m in enumerate(mods) if u < self.probability * (i + 1)), [])
        return list(self.modalities) if u < self.probability else []

    def __call__(self, inputs: Mapping[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
        if self.level == 0:
            return dict(inputs)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(index))
        modalities = list(self.modalities)
        if self.either or self.probability < 1.0:  # no draw otherwise: the plain grids' noise stays as it was
            modalities = self.chosen(float(torch.rand((), generator=g)))
        out = dict(inputs)
        for m in modalities:  # a fixed order: the draws of one modality never depend on another's shape
            x = out[m].float() if not out[m].is_floating_point() else out[m]
            for noise in self.noises:
                if noise == "white":
                    x = white_noise(x, self.level, g)
                elif noise == "gaussian":
                    x = white_noise(x, self.level, g, self.scales.get(m, 1.0))
                elif noise == "gaussian_mean_abs":
                    x = mean_abs_noise(x, self.level, g)
                elif noise == "feature_drop":
                    x = feature_drop(x, self.level, g)
                elif noise == "timestep_drop":
                    if x.dim() < 2:
                        raise ConfigError(
                            "Noise 'timestep_drop' needs sequences (a sample of shape (time, features)); "
                            f"modality '{m}' has samples of shape {tuple(x.shape)}. Use `gaussian`, `white` "
                            "or `feature_drop` for it."
                        )
                    x = timestep_drop(x, self.level, g)
            out[m] = x
        return out


class CorruptedDataset(Dataset):
    """A dataset whose samples' inputs pass through ``corrupt(inputs, index)``."""

    def __init__(self, base: Dataset, corrupt: Callable[[Mapping[str, torch.Tensor], int], dict]) -> None:
        self.base, self.corrupt = base, corrupt

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.base[i]
        return {**item, "inputs": self.corrupt(item["inputs"], i)}


def check_grid(grid: Mapping[str, Any], modalities: Sequence[str]) -> dict[str, Any]:
    """A validated plain copy of a robustness grid config."""
    levels = [float(v) for v in grid.get("levels") or []]
    noises = list(grid.get("noise") or [])
    scopes = list(grid.get("scopes") or ["all"])
    bad = [n for n in noises if n not in NOISES]
    if not levels or not noises or bad:
        raise ConfigError(
            f"robustness needs `levels` (a list of noise levels) and `noise` (a list of {list(NOISES)}); got "
            f"levels={levels}, noise={noises}. Pick a grid with `robustness=<name>` (configs/robustness/)."
        )
    if any(v < 0 for v in levels) or levels != sorted(levels):
        raise ConfigError(f"robustness.levels must be non-negative and increasing, got {levels}.")
    if any(("drop" in n) and v > 1 for n in noises for v in levels):
        raise ConfigError(f"Drop probabilities must lie in [0, 1]; robustness.levels are {levels}.")
    unknown = [s for s in scopes if s not in SCOPES and s not in modalities]
    if unknown:
        raise ConfigError(
            f"robustness.scopes {unknown} unknown: use 'all', 'each', 'either' or modality names of this "
            f"dataset {list(modalities)}."
        )
    probability = float(grid.get("probability", 1.0))
    if not 0.0 < probability <= 1.0:
        raise ConfigError(
            f"robustness.probability (the share of corrupted samples) must lie in (0, 1], got {probability}."
        )
    if "either" in scopes and probability * len(modalities) > 1.0 + 1e-9:
        raise ConfigError(
            f"Scope 'either' corrupts one of {len(modalities)} modalities per sample, each with probability "
            f"robustness.probability={probability}; their sum must not exceed 1. Set probability <= "
            f"{1.0 / len(modalities):.4g} (DynMM's protocol: 0.33 for rgb/depth)."
        )
    spec: dict[str, Any] = {
        "levels": levels,
        "noise": noises,
        "scopes": scopes,
        "seed": int(grid.get("seed", 0)),
        "batch_size": int(grid.get("batch_size", 256)),
        "name": grid.get("name"),
    }
    if "probability" in grid:  # optional keys enter the record only when set: older records stay as they were
        spec["probability"] = probability
    if grid.get("seeds") is not None:
        seeds = [int(v) for v in grid["seeds"]]
        if not seeds or len(set(seeds)) != len(seeds):
            raise ConfigError(
                f"robustness.seeds must be a non-empty list of distinct noise seeds, got {seeds}."
            )
        if grid.get("seed") is not None and int(grid["seed"]) != seeds[0]:
            raise ConfigError(
                f"robustness sets both seed={grid['seed']} and seeds={seeds}: give `seeds` (repeated noise "
                "draws, e.g. [0,1,...,9]) or `seed` (one draw), not both."
            )
        spec["seeds"], spec["seed"] = seeds, seeds[0]
    return spec


def scope_modalities(scopes: Sequence[str], modalities: Sequence[str]) -> dict[str, list[str]]:
    """Curve name -> corrupted modalities (``all`` -> every one; ``each`` -> one curve per modality;
    ``either`` -> every one, of which each sample gets one)."""
    out: dict[str, list[str]] = {}
    for s in scopes:
        if s == "all":
            out["all"] = list(modalities)
        elif s == "each":
            out.update({m: [m] for m in modalities})
        elif s == "either":  # one modality per sample (`Corruption.either`)
            out["either"] = sorted(modalities)
        else:
            out[s] = [s]
    return out


def modality_stds(dataset: Dataset, modalities: Sequence[str], batch_size: int) -> dict[str, float]:
    """Std of every modality's values over a (clean) split: the unit of the ``gaussian`` noise."""
    sums = {m: [0.0, 0.0, 0] for m in modalities}
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        for m in modalities:
            x = batch["inputs"][m].double()
            sums[m][0] += float(x.sum())
            sums[m][1] += float((x * x).sum())
            sums[m][2] += x.numel()
    out = {}
    for m, (s, ss, n) in sums.items():
        mean = s / max(n, 1)
        out[m] = float(np.sqrt(max(ss / max(n, 1) - mean * mean, 0.0)))
    return out


def batch_limit(trainer: Mapping[str, Any]) -> int | float | None:
    """The test-batch limit of a trainer config (Lightning's ``fast_dev_run`` / ``limit_test_batches``),
    which the robustness passes follow so that a debug run stays short: an int is a number of batches, a
    float a share of them, None every batch."""
    fdr = trainer.get("fast_dev_run", False)
    if fdr:
        return 1 if fdr is True else int(fdr)
    limit = trainer.get("limit_test_batches")
    if limit is None or (isinstance(limit, float) and limit >= 1.0):
        return None
    if limit <= 0:
        raise ConfigError(
            f"trainer.limit_test_batches={limit} turns the test off, and a robustness grid has nothing to "
            "evaluate then. Drop `robustness=` or give test batches (e.g. limit_test_batches=1)."
        )
    return limit


def limited(n_batches: int, limit: int | float | None) -> int:
    """How many of ``n_batches`` a ``batch_limit`` keeps (a share keeps at least one, as Lightning's)."""
    if limit is None:
        return n_batches
    if isinstance(limit, float):
        return min(n_batches, max(1, int(n_batches * limit)))
    return min(n_batches, int(limit))


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: Dataset,
    task_type: str,
    num_outputs: int,
    batch_size: int,
    extra: tuple[str, ...] = (),
    limit: int | float | None = None,
) -> dict[str, float]:
    """Test metrics of ``model`` on ``dataset`` (the task's metric collection, eval mode), on its first
    batches only under a ``batch_limit``."""
    metrics = make_metrics(task_type, num_outputs, extra)
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for batch in itertools.islice(loader, limited(len(loader), limit)):
        inputs = {m: x.to(device) for m, x in batch["inputs"].items()}
        out = model(inputs)
        metrics.update(
            *(t.cpu() for t in prepare_for_metrics(task_type, out.logits, batch["target"].to(device)))
        )
    return {k: float(v) for k, v in metrics.compute().items()}


def auc(levels: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoid area under ``values`` against ``levels``."""
    x, y = np.asarray(levels, dtype=float), np.asarray(values, dtype=float)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def relative_auc(
    levels: Sequence[float], model: Sequence[float], baseline: Sequence[float], metric: str
) -> float:
    """Pro-Fusion's tau = integral of Perf(f) - Perf(b), negated for error metrics (higher = more robust)."""
    tau = auc(levels, np.asarray(model, dtype=float) - np.asarray(baseline, dtype=float))
    return -tau if lower_is_better(metric) else tau


def lower_is_better(metric: str) -> bool:
    return metric.split("/")[-1] in ERROR_METRICS


def scale_unit(values: Mapping[str, float]) -> dict[str, float]:
    """Min-max scale to [0, 1] across the compared models (all equal -> all 0)."""
    finite = [v for v in values.values() if np.isfinite(v)]
    if not finite:
        return {k: float("nan") for k in values}
    lo, hi = min(finite), max(finite)
    return {
        k: (float((v - lo) / (hi - lo)) if hi > lo else 0.0) if np.isfinite(v) else float("nan")
        for k, v in values.items()
    }


def run_grid(task: Any, dm: Any, grid: Mapping[str, Any], limit: int | float | None = None) -> dict[str, Any]:
    """Evaluate ``task.model`` on the test split under every point of ``grid``: the record's
    ``robustness``. A debug run's ``batch_limit`` evaluates each point on the first batches only, and the
    record says so (``limit_batches``).

    Per curve: ``modalities``, ``metrics`` (name -> one value per level; the mean over ``seeds`` when the
    grid has several), ``auc`` (of those values); with several seeds also ``std`` (name -> population std per
    level) and ``per_seed`` (name -> per level, one value per seed)."""
    spec = check_grid(grid, dm.modalities)
    model = task.model
    was_training = model.training
    model.eval()
    start = time.time()
    scales = (
        modality_stds(dm.test_set, dm.modalities, spec["batch_size"]) if "gaussian" in spec["noise"] else {}
    )
    seeds = spec.get("seeds") or [spec["seed"]]
    curves: dict[str, Any] = {}
    for si, (scope, mods) in enumerate(scope_modalities(spec["scopes"], dm.modalities).items()):
        per_level: list[list[dict[str, float]]] = []  # [level][seed] -> metrics
        for li, level in enumerate(spec["levels"]):
            per_seed: list[dict[str, float]] = []
            for seed in seeds:
                if level == 0 and per_seed:  # level 0 is the clean split whatever the seed
                    per_seed.append(per_seed[0])
                    continue
                corruption = Corruption(
                    spec["noise"],
                    level,
                    mods,
                    seed=(seed * 1009 + li) * 1013 + si,
                    scales=scales,
                    probability=spec.get("probability", 1.0),
                    either=scope == "either",
                )
                per_seed.append(
                    evaluate(
                        model,
                        dm.robustness_set(corruption),
                        task.task_type,
                        dm.num_outputs,
                        spec["batch_size"],
                        tuple(getattr(task, "extra_metrics", ())),
                        limit,
                    )
                )
            per_level.append(per_seed)
        names = sorted(per_level[0][0])
        if len(seeds) == 1:
            values = {k: [p[0][k] for p in per_level] for k in names}
            curves[scope] = {"modalities": mods, "metrics": values}
        else:
            runs = {k: [[r[k] for r in p] for p in per_level] for k in names}
            values = {k: [float(np.mean(v)) for v in runs[k]] for k in names}
            std = {k: [float(np.std(v)) for v in runs[k]] for k in names}
            curves[scope] = {"modalities": mods, "metrics": values, "std": std, "per_seed": runs}
        curves[scope]["auc"] = {k: auc(spec["levels"], v) for k, v in values.items()}
        log.info("robustness curve %r (%s): raw AUC %s", scope, ",".join(spec["noise"]), curves[scope]["auc"])
    model.train(was_training)
    out = {**spec, "scales": scales, "curves": curves, "wall_time_s": round(time.time() - start, 2)}
    if limit is not None:
        out["limit_batches"] = limit
    return out


__all__ = [
    "NOISES",
    "CorruptedDataset",
    "Corruption",
    "auc",
    "batch_limit",
    "check_grid",
    "evaluate",
    "feature_drop",
    "lower_is_better",
    "mean_abs_noise",
    "relative_auc",
    "run_grid",
    "scale_unit",
    "scope_modalities",
    "timestep_drop",
    "white_noise",
]
