"""Logger pieces: a CSV logger that keeps a resumed run's history, the training curves read back from its
file, and the hyper-parameters every logger gets.

Lightning's CSV logger deletes ``metrics.csv`` when its folder exists, so a run killed and resumed kept only
the epochs after the restart; `CSVLogger` appends instead (rows of epochs replayed after the last checkpoint
appear twice, in order).
"""

from __future__ import annotations

import csv
import os
from typing import Any

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import CSVLogger as _CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        pass  # Lightning deletes metrics.csv here; a resumed run keeps its history

    def _header(self) -> list[str]:
        if not os.path.isfile(self.metrics_file_path):
            return []
        with open(self.metrics_file_path, newline="") as fh:
            return list(next(csv.reader(fh), []))

    def save(self) -> None:
        """Append the buffered rows under the union of the file's header and their keys (several writers,
        e.g. the processes of ddp_spawn or a run's attempts, write one file in turn)."""
        if not self.metrics:
            return
        header = self._header()
        keys = sorted(set(header).union(*self.metrics))
        if header and keys != header:  # new columns: rewrite what is there under the wider header
            with open(self.metrics_file_path, newline="") as fh:
                rows = list(csv.DictReader(fh))
            with open(self.metrics_file_path, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=keys)
                writer.writeheader()
                writer.writerows(rows)
        with open(self.metrics_file_path, "a" if header else "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            if not header:
                writer.writeheader()
            writer.writerows(self.metrics)
        self.metrics_keys, self.metrics = keys, []


class CSVLogger(_CSVLogger):
    """`pytorch_lightning.loggers.CSVLogger` whose ``metrics.csv`` grows across a run's attempts."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def history_from_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-epoch ``train/`` and ``val/`` metrics of a CSV log (``csv/metrics.csv``) in the form of the
    record's ``history`` (`fusionbench.callbacks.EpochLog`): one entry per epoch, in order. Lightning writes
    an epoch's validation and training means on separate rows; a resumed run's replayed epochs appear twice,
    and the later rows (the attempt that finished) win."""
    entries: dict[int, dict[str, Any]] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            if not row.get("epoch"):
                continue
            epoch = int(float(row["epoch"]))
            for key, value in row.items():
                if key and key.startswith(("train/", "val/")) and not key.endswith("_step") and value:
                    entries.setdefault(epoch, {"epoch": epoch})[key] = float(value)
    return [entries[epoch] for epoch in sorted(entries)]


def run_hparams(cfg: DictConfig, record_facts: dict[str, Any]) -> dict[str, Any]:
    """What every logger records about a run: the resolved config plus parameter count, tags, git sha,
    config hash (CSV: ``hparams.yaml``; TensorBoard: its hparams; wandb: the run config)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("hydra", None)
    return {**config, "run": record_facts}
