"""One run folder, one configuration: what `fusionbench.train` checks before it skips, resumes or starts.

A table run lives in ``results/runs/<experiment>/seed=<n>``. Before the run loop reuses anything there, the
configuration that made it (the record's ``config``, else the folder's ``.hydra/config.yaml``) must be the
requested one, compared as the resolved config minus the keys in `NOT_HASHED` (paths, loggers, progress
display: they do not change what is trained). A mismatch stops with the keys that differ. A lock file stops
a second process from training the same folder. Resuming takes the newest checkpoint that loads; one that
does not (a truncated ``last.ckpt`` after a full disk) is moved aside, so it never blocks the seed again.
Fusionbench writes ``.hydra/config.yaml`` and ``overrides.yaml`` itself, when a run starts or resumes
(``hydra.output_subdir`` is off), so a relaunch that is refused or skipped leaves a finished run's files as
they were.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from fusionbench.errors import ConfigError

log = logging.getLogger("fusionbench")

# top-level keys and dotted keys that do not change what a run trains or measures
NOT_HASHED = (
    "paths",
    "logger",
    "tags",
    "force",
    "resume",
    "ckpt_path",
    "train",
    "test",
    "experiment_name",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "trainer.default_root_dir",
    "dataset.how_to_get",
)
# top-level keys added after runs were recorded: left out of the hash at the value that reproduces the
# behaviour before them, so the records made before they existed still match their configuration
NEUTRAL = {"scheduler_interval": "epoch", "optimizer_groups": None, "scheduler_monitor": None}
CONFIG_FILE = Path(".hydra") / "config.yaml"
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"


def hashed_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved configuration that decides what a run is: ``cfg`` minus `NOT_HASHED`, resolved with each
    ``paths.<key>`` standing for itself (``<paths.output_dir>/checkpoints``), so that moving the results or
    data folder does not make a run another configuration."""
    raw = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    for key in list(raw.get("paths") or {}):
        raw.paths[key] = f"<paths.{key}>"
    out = json.loads(json.dumps(OmegaConf.to_container(raw, resolve=True), default=str))  # plain types
    out.pop("hydra", None)
    for key, value in NEUTRAL.items():
        if key in out and out[key] == value:
            del out[key]
    for key in NOT_HASHED:
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "", limit: int = 8) -> list[str]:
    """``key: old -> new`` for the leaves that differ (``(absent)`` where a side lacks the key)."""
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        a, b = old.get(key, "(absent)"), new.get(key, "(absent)")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{path}.", limit)
        elif a != b:
            out.append(f"{path}: {json.dumps(a)[:60]} -> {json.dumps(b)[:60]}")
    return out[:limit] if not prefix else out


def previous_config(output_dir: Path, record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The hashed configuration that made what ``output_dir`` holds, or None if it cannot be told."""
    if record and isinstance(record.get("config"), dict):
        return record["config"]
    path = output_dir / CONFIG_FILE
    if not path.is_file():
        return None
    try:  # a record older than config hashes: its folder's config, resolved as it would be now
        return hashed_config(OmegaConf.load(path))
    except Exception as exc:  # noqa: BLE001 - an unreadable or unresolvable old config: cannot be told
        log.warning("Could not read the configuration of %s: %s", path, exc)
        return None


def check_same_config(output_dir: Path, old: dict[str, Any] | None, new: dict[str, Any], what: str) -> None:
    """Refuse to reuse ``what`` (a finished record or a checkpoint) made by another configuration."""
    if old is not None and config_hash(old) == config_hash(new):
        return
    if old is None:
        differs = "its configuration is unknown (no record config and no readable .hydra/config.yaml)"
    else:
        differs = "it was made with another configuration: " + "; ".join(config_diff(old, new))
    raise ConfigError(
        f"{output_dir} holds {what}, but {differs}. Nothing was changed. To replace it with this "
        "configuration add `force=true`; to keep both, give this run another folder (another "
        "`experiment_name=`, or `paths.results_dir=` for table runs, `hydra.run.dir=` otherwise)."
    )


def check_finished(output_dir: Path, record: dict[str, Any], new: dict[str, Any]) -> None:
    """A finished run is reused only when this configuration made it. Records written before configurations
    were hashed (no ``config`` entry) cannot be checked exactly: their folder's config predates renamed
    targets and added callbacks, so they are kept, with a warning that lists how they differ."""
    if "config" in record:
        check_same_config(output_dir, record["config"], new, "a finished run")
        return
    old = previous_config(output_dir, None)
    differs = config_diff(old, new, limit=3) if old is not None else ["its config is unreadable"]
    if old is None or config_hash(old) != config_hash(new):
        log.warning(
            "%s holds a finished run recorded before configurations were hashed; it is kept as it is, but "
            "its .hydra/config.yaml differs from this configuration (%s; docs/reproducing.md lists the "
            "renamed keys). `force=true` remakes it.",
            output_dir,
            "; ".join(differs),
        )


@contextmanager
def run_lock(output_dir: Path) -> Iterator[None]:
    """Hold ``<output_dir>/.lock`` for the run; a second process on the same folder stops at once."""
    path = output_dir / ".lock"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+")  # noqa: SIM115 - held for the whole run
    except OSError as exc:
        raise ConfigError(
            f"Cannot write the run folder {output_dir}: {exc.strerror or exc}. Make it (or its parent) "
            "writable, free disk space, or point the run elsewhere (`paths.results_dir=` for table runs, "
            "`hydra.run.dir=` otherwise)."
        ) from exc
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            owner = fh.read().strip() or "another process"
            raise ConfigError(
                f"{output_dir} is being trained by {owner} right now (its lock file {path} is held). Wait "
                "for it to finish, or run this one into another folder; two processes training one seed "
                "would resume each other's checkpoints."
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {os.uname().nodename} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _epoch_of(path: Path) -> int:
    m = re.search(r"(\d+)", path.stem)
    return int(m.group(1)) if m else -1


def loadable(path: Path) -> bool:
    try:
        torch.load(path, map_location="cpu", weights_only=False)
        return True
    except Exception:  # noqa: BLE001 - any failure to read it means it cannot be resumed from
        return False


def resume_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint of ``output_dir`` that loads: ``last.ckpt``, else the latest ``epoch*.ckpt``
    (each holds the random generators' states, so resuming from an earlier epoch replays the same epochs).
    Checkpoints that do not load are renamed ``*.corrupt`` with a warning."""
    folder = output_dir / "checkpoints"
    if not folder.is_dir():
        return None
    candidates = [folder / "last.ckpt"] if (folder / "last.ckpt").is_file() else []
    candidates += sorted(folder.glob("epoch*.ckpt"), key=_epoch_of, reverse=True)
    for path in candidates:
        if loadable(path):
            return path
        aside = path.with_name(f"{path.name}.corrupt")
        os.replace(path, aside)
        log.warning("%s does not load (truncated or corrupt); moved it to %s.", path, aside.name)
    return None


def write_config_files(output_dir: Path, cfg: DictConfig, overrides: list[str]) -> None:
    """``.hydra/config.yaml`` (unresolved, as Hydra writes it) and ``overrides.yaml`` of this attempt."""
    from fusionbench.records import write_text

    write_text(output_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg))
    write_text(output_dir / OVERRIDES_FILE, OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
