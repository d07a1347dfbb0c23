"""Collect run records (``metrics.json``) from run folders into a pandas frame.

A run folder's ``robustness.json`` (curves of the tested checkpoint measured after training,
``scripts/eval_robustness.py``) supplies the record's curves when training measured none
(`attach_robustness`); its ``history.json`` (the training curves read back from the run's CSV log,
``scripts/history_from_csv.py``) supplies the record's ``history`` for runs older than
`fusionbench.callbacks.EpochLog`'s (`attach_history`).

Only finished runs count: a folder without a record, with a record whose status is not
``complete``, or from a fast dev run is skipped. One row per (experiment, seed): if two folders
hold the same pair, the one whose path sorts last wins and a warning names both.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from fusionbench.records import RECORD_NAME

log = logging.getLogger(__name__)

ROBUSTNESS_NAME = "robustness.json"  # scripts/eval_robustness.py
HISTORY_NAME = "history.json"  # scripts/history_from_csv.py


def flatten(record: dict[str, Any]) -> dict[str, Any]:
    """One flat row: test metrics under their own keys (``test/acc``) plus run facts."""
    row: dict[str, Any] = {"experiment_name": record.get("experiment_name"), "seed": record.get("seed")}
    row.update(record.get("metrics", {}))
    best = record.get("best_val") or {}
    row["best_val"] = best.get("value")
    row["best_epoch"] = best.get("epoch")
    row["test_checkpoint"] = record.get("test_checkpoint")  # epoch<k>.ckpt, last.ckpt or "final weights"
    row["wall_time_s"] = record.get("wall_time_s")
    row["epochs_trained"] = record.get("epochs_trained")
    row["params"] = (record.get("params") or {}).get("total")
    row["git_sha"] = (record.get("git") or {}).get("sha")
    row["madds"] = (record.get("compute") or {}).get(
        "madds"
    )  # multiply-adds per sample at batch 1 (fusionbench.compute)
    row["robustness"] = record.get("robustness")  # noise curves (robustness tables), or None
    row["history"] = record.get("history")  # per-epoch train/ and val/ metrics (EpochLog), or None
    row["deq_test_converged"] = deq_test_converged(record)
    for batch, ms in (
        (record.get("dynmm_timing") or {}).get("ms_per_sample") or {}
    ).items():  # fusionbench.fusion.dynmm.timing
        for key, value in ms.items():
            row[f"dynmm_timing/b{batch}/{key}"] = value
    for scope, curve in ((row["robustness"] or {}).get("curves") or {}).items():
        for metric, area in (curve.get("auc") or {}).items():  # raw AUCs as plain columns (curve tables)
            row[f"robustness/{scope}/{metric}_auc"] = area
    return row


def deq_test_converged(record: dict[str, Any]) -> float | None:
    """Share of test samples whose DEQ forward solve converged (None: no DEQ fusion in the run).

    From the ``deq_solver`` entry of `fusionbench.fusion.deq.callbacks.DEQMonitor`; records older than it have
    only the mean test residual, and count as converged when it is within the default failure tolerance
    0.1."""
    solver = (record.get("deq_solver") or {}).get("test_forward") or {}
    if "converged" in solver:
        return float(solver["converged"])
    metrics = record.get("metrics") or {}
    if "test/deq/f_converged" in metrics:  # a spawned test's DEQMonitor counted nothing; its logged share
        return float(metrics["test/deq/f_converged"])
    if "test/deq/f_failed" in metrics:
        return 1.0 - float(metrics["test/deq/f_failed"])
    residual = metrics.get("test/deq/rel_residual", metrics.get("test/deq/abs_residual"))
    return None if residual is None else float(residual <= 0.1)


def attach_robustness(record: dict[str, Any], folder: Path) -> None:
    """Robustness curves measured after training (``scripts/eval_robustness.py`` writes ``robustness.json``
    into the run folder) supply a record's curves when training measured none, provided they were measured
    on the checkpoint the run tested."""
    path = folder / ROBUSTNESS_NAME
    if record.get("robustness") or not path.is_file():
        return
    try:
        measured = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("Skipping unreadable robustness file %s: %s", path, e)
        return
    if measured.get("checkpoint") == record.get("test_checkpoint") and measured.get("robustness"):
        record["robustness"] = measured["robustness"]
    else:
        log.warning(
            "%s is for checkpoint %s, the run tested %s; not used.",
            path,
            measured.get("checkpoint"),
            record.get("test_checkpoint"),
        )


def attach_history(record: dict[str, Any], folder: Path) -> None:
    """A ``history.json`` read back from the run's own CSV log supplies the training curves of a record
    written before records carried them, or of one whose history lacks epochs the run trained (records
    written by dc1eea0..f03932d kept only the epochs up to the tested checkpoint's); otherwise the record's
    own ``history`` wins."""
    path = folder / HISTORY_NAME
    if history_complete(record) or not path.is_file():
        return
    try:
        record["history"] = json.loads(path.read_text())["history"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("Skipping unreadable training history %s: %s", path, e)


def history_complete(record: dict[str, Any]) -> bool:
    """Whether the record's own history has an entry for every epoch it trained."""
    history = record.get("history") or []
    trained = record.get("epochs_trained")
    return bool(history) and (trained is None or len(history) >= int(trained))


def collect_runs(roots: Iterable[str | Path]) -> pd.DataFrame:
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        for path in sorted(root.rglob(RECORD_NAME)):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                log.warning("Skipping unreadable run record %s: %s", path, e)
                continue
            if record.get("status") != "complete" or record.get("fast_dev_run"):
                continue
            if "debug" in (record.get("tags") or []):  # debug=limit: a share of the batches, not a result
                log.warning(
                    "%s is a debug run (tag 'debug'); not used. Rerun it without debug=.", path.parent
                )
                continue
            attach_robustness(record, path.parent)
            attach_history(record, path.parent)
            row = flatten(record)
            row["path"] = str(path.parent)
            key = (row["experiment_name"], row["seed"])
            if key in rows:
                log.warning(
                    "Two runs of %s seed %s: %s and %s; using the latter",
                    *key,
                    rows[key]["path"],
                    row["path"],
                )
            rows[key] = row
    frame = pd.DataFrame(list(rows.values()))
    if frame.empty:
        frame = pd.DataFrame(columns=["experiment_name", "seed", "path"])
    return frame.sort_values(["experiment_name", "seed"], kind="stable").reset_index(drop=True)
