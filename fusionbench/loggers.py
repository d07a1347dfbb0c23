"""Logger pieces: a CSV logger that keeps a resumed run's history, and the hyper-parameters every logger gets.

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
        if os.path.isfile(self.metrics_file_path):  # continue under the existing header
            with open(self.metrics_file_path, newline="") as fh:
                self.metrics_keys = list(next(csv.reader(fh), []))


class CSVLogger(_CSVLogger):
    """`pytorch_lightning.loggers.CSVLogger` whose ``metrics.csv`` grows across a run's attempts."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def run_hparams(cfg: DictConfig, record_facts: dict[str, Any]) -> dict[str, Any]:
    """What every logger records about a run: the resolved config plus parameter count, tags, git sha,
    config hash (CSV: ``hparams.yaml``; TensorBoard: its hparams; wandb: the run config)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("hydra", None)
    return {**config, "run": record_facts}
