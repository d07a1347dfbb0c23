"""Show which datasets are in place, and import or build local copies. Never downloads anything.

    python scripts/prepare_data.py status                                # every dataset, checksums too
    python scripts/prepare_data.py status --quick                        # presence only
    python scripts/prepare_data.py brca --from ~/Downloads/MOGONET/BRCA  # copy + verify into data/brca
    python scripts/prepare_data.py rosmap --verify                       # check what is in data/rosmap
    python scripts/prepare_data.py avmnist --mnist MNIST_DIR --fsdd FSDD_DIR  # build from MNIST + FSDD
    python scripts/prepare_data.py nyuv2 --from nyu_depth_v2_labeled.mat      # ESANet's layout from the .mat

The data root is the configs' `paths.data_dir`: $FUSIONBENCH_DATA_DIR when set, else data/ (--data-dir
overrides both). `status` lists every config in configs/dataset/ as verified (every file matches its
published checksum), present (files there; no checksum to compare, or --quick), missing, corrupt (a
checksum mismatch or an unreadable file, named) or generated (built in memory, no files), with the
folder it looked in and where the data comes from; it changes nothing and exits 0 whatever it finds.

Files are copied into a hidden staging folder beside the target and moved into place only when every
file is present and matches its published checksum, so a failed import leaves nothing half-written.
AV-MNIST is built (not copied) from MNIST + FSDD the same way; see fusionbench/data/avmnist_build.py.
NYUv2 is written from the official labeled .mat (frame by frame) in ESANet's PNG layout, with the split and
class maps shipped in data/nyuv2/ (--splits / --meta for others) and a SHA256SUMS that every run verifies;
see fusionbench/data/nyuv2.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import fusionbench.train  # noqa: F401  (registers the fb.root resolver that paths.data_dir uses)
from fusionbench import ROOT
from fusionbench.data.avmnist import AVMNISTDataModule
from fusionbench.data.avmnist_build import STAGING_OWNER, build_avmnist, remove_stale_staging
from fusionbench.data.nyuv2 import META_DIR, NYUv2DataModule, prepare_nyuv2
from fusionbench.errors import DatasetError, FusionbenchError

MOGONET = ("brca", "rosmap")
CONFIG_DIR = ROOT / "configs"
GENERATED_SOURCE = "nothing to get: generated in memory from the config and its seed"
NO_CHECKSUM = "no published checksum: presence only"
STAGING_NAME = re.compile(r"^\.([A-Za-z0-9_]+)-[a-z0-9_]{8}$")  # tempfile.mkdtemp(prefix=".<dataset>-")
STATES = ("verified", "present", "missing", "corrupt", "generated", "error")


def datamodule(name: str, data_dir: Path):
    cfg = OmegaConf.load(CONFIG_DIR / "dataset" / f"{name}.yaml")
    cfg.data_dir = str(data_dir)
    return instantiate(cfg, _convert_="all")


def dataset_names() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "dataset").glob("*.yaml"))


def compose_datasets(names: list[str], data_dir: Path | None = None) -> dict[str, DictConfig]:
    """``{name: composed config}`` as `python train.py dataset=<name>` composes it (defaults lists such
    as stocks_health's, `paths.data_dir` from FUSIONBENCH_DATA_DIR or configs/local), with
    ``paths.data_dir`` replaced by ``data_dir`` when given."""
    out = {}
    GlobalHydra.instance().clear()  # another initialize (a test, a notebook) would refuse ours
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            for name in names:
                cfg = compose(config_name="train", overrides=[f"dataset={name}"])
                if data_dir is not None:
                    cfg.paths.data_dir = str(data_dir.expanduser())
                out[name] = cfg
    finally:
        GlobalHydra.instance().clear()
    return out


def data_root(override: Path | None = None) -> Path:
    """The data root every dataset config reads: ``override``, else the configs' `paths.data_dir`."""
    if override is not None:
        return override.expanduser()
    return Path(compose_datasets(["rosmap"])["rosmap"].paths.data_dir)


# -- status ------------------------------------------------------------------------------------


@dataclass
class DatasetStatus:
    """One row of `status`: ``state`` is one of `STATES`; ``problem`` is the loader's own message."""

    name: str
    state: str
    folder: str
    detail: str
    source: str
    problem: str = ""


def _named(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _unchecked(dm) -> list[str]:
    """Required files whose content the datamodule's `prepare_data()` did not compare with a checksum."""
    files = dm.required_files()
    if not dm.verify_checksums:
        return files
    if isinstance(dm, (AVMNISTDataModule, NYUv2DataModule)):  # a local build's manifest covers every file
        return [] if dm.manifest is not None else files
    return [f for f in files if f not in dm.checksums]


def check_dataset(name: str, cfg: DictConfig, quick: bool = False) -> DatasetStatus:
    """The state of one dataset, decided by its datamodule's own guard (`required_files()`,
    `prepare_data()` with its checksums). Reads files, never writes or downloads."""
    node = cfg.dataset
    if "data_dir" not in node:
        return DatasetStatus(name, "generated", "-", "no files", GENERATED_SOURCE)
    source = _one_line(node.get("how_to_get") or "")
    try:
        dm = instantiate(node, _convert_="all")
    except Exception as e:  # a config its loader rejects: a bug to report, not a state of the data
        folder = str(OmegaConf.select(cfg, "dataset.data_dir", default="?"))
        return DatasetStatus(name, "error", folder, "the config does not build", source, _one_line(e))
    folder, source = dm.data_dir, source or _one_line(dm.how_to_get)
    files = dm.required_files()
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        if not folder.is_dir():
            detail = "folder does not exist"
        elif len(missing) == len(files):
            detail = f"none of its {len(files)} files: {_named(missing)}"
        else:
            detail = f"{len(missing)} of {len(files)} files missing: {_named(missing)}"
        if not isinstance(dm, (AVMNISTDataModule, NYUv2DataModule)) and len(_unchecked(dm)) == len(files):
            detail += f"; {NO_CHECKSUM}"  # say up front that a copy will not be verified
        return DatasetStatus(name, "missing", str(folder), detail, source)
    if quick:
        return DatasetStatus(
            name, "present", str(folder), f"{len(files)} files; checksums not checked", source
        )
    try:
        dm.prepare_data()
    except (DatasetError, OSError, ValueError, EOFError) as e:  # mismatch, unreadable or malformed file
        message = _one_line(e)
        named = [f for f in [*files, "manifest.json"] if f in message]
        bad = f"bad file{'s' * (len(named) > 1)}: {_named(named)}" if named else "unreadable or inconsistent"
        detail = f"{bad} (see Problems)"
        return DatasetStatus(name, "corrupt", str(folder), detail, source, message)
    except Exception as e:  # a loader bug, not the data: report it and go on with the others
        return DatasetStatus(
            name, "error", str(folder), "its check crashed", source, f"{type(e).__name__}: {e}"
        )
    unchecked = _unchecked(dm)
    if not unchecked:
        detail = f"{len(files)} files match their published checksums"
        return DatasetStatus(name, "verified", str(folder), detail, source)
    if not dm.verify_checksums:
        detail = "dataset.verify_checksums=false: presence only"
    elif isinstance(dm, AVMNISTDataModule):
        detail = "MultiBench files (no manifest.json): shapes only"
    elif isinstance(dm, NYUv2DataModule):
        detail = "no SHA256SUMS (not written by prepare_data.py): presence of every listed frame only"
    elif len(unchecked) == len(files):
        detail = NO_CHECKSUM
    else:  # partly covered: say which files nothing vouches for
        detail = (
            f"{len(files) - len(unchecked)} of {len(files)} match checksums; none for {_named(unchecked)}"
        )
        return DatasetStatus(name, "verified", str(folder), detail, source)
    return DatasetStatus(name, "present", str(folder), detail, source)


def stale_staging(root: Path, names: list[str]) -> list[Path]:
    """Hidden staging folders of imports / builds into ``root`` that did not finish (or are running)."""
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.iterdir() if (m := STAGING_NAME.match(p.name)) and m.group(1) in names and p.is_dir()
    )


def format_table(rows: list[list[str]]) -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join([c.ljust(w) for c, w in zip(r, widths)] + [r[-1]]).rstrip() for r in rows)


def status(data_dir: Path | None = None, quick: bool = False) -> tuple[str, list[DatasetStatus]]:
    """The `status` report (text) and its rows, for every config in configs/dataset/."""
    names = dataset_names()
    cfgs = compose_datasets(names, data_dir)
    rows = [check_dataset(n, cfgs[n], quick) for n in names]
    rows.sort(key=lambda r: (r.state == "generated", r.name))  # datasets with files first
    root = Path(next(iter(cfgs.values())).paths.data_dir)
    if data_dir is not None:
        why = "--data-dir"
    elif os.environ.get("FUSIONBENCH_DATA_DIR"):
        why = "paths.data_dir from FUSIONBENCH_DATA_DIR"
    else:
        why = "paths.data_dir; set FUSIONBENCH_DATA_DIR or pass --data-dir to look elsewhere"
    checks = (
        "presence only (--quick)" if quick else "presence and published checksums (--quick: presence only)"
    )
    lines = [f"data root: {root}  ({why})", f"checks:    {checks}", ""]
    table = [["DATASET", "STATE", "FOLDER", "DETAIL", "HOW TO GET IT"]]
    table += [[r.name, r.state, r.folder, r.detail, r.source] for r in rows]
    lines.append(format_table(table))
    problems = [r for r in rows if r.problem]
    if problems:
        lines += ["", "Problems (the loaders' own messages):"]
        lines += [f"- {r.name}: {r.problem}" for r in problems]
    leftovers = stale_staging(root, names)
    if leftovers:
        lines += [
            "",
            "Staging folders of imports/builds that were killed (or are running now): "
            + ", ".join(p.name for p in leftovers)
            + f" in {root}. The next import/build of that dataset removes them; or delete them by hand "
            "when no prepare_data.py is running.",
        ]
    counts = {s: sum(r.state == s for r in rows) for s in STATES}
    lines += ["", ", ".join(f"{n} {s}" for s, n in counts.items() if n)]
    return "\n".join(lines), rows


# -- import ------------------------------------------------------------------------------------


def import_mogonet(name: str, source: Path, data_root: Path) -> Path:
    target = data_root / name
    probe = datamodule(name, source)
    missing = [f for f in probe.required_files() if not (source / f).is_file()]
    if missing:
        raise FusionbenchError(
            f"{source} lacks {', '.join(missing)}; point --from at the {name.upper()}/ folder of MOGONET."
        )
    data_root.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(data_root, name, log=lambda msg: print(f"{name}: {msg}", flush=True))
    with tempfile.TemporaryDirectory(dir=data_root, prefix=f".{name}-") as tmp:
        owner = {"host": socket.gethostname(), "pid": os.getpid()}  # see remove_stale_staging
        (Path(tmp) / STAGING_OWNER).write_text(json.dumps(owner) + "\n")
        staging = Path(tmp) / name
        staging.mkdir()
        for f in sorted(source.iterdir()):
            if f.is_file() and f.suffix in (".csv", ".md"):
                shutil.copy2(f, staging / f.name)
        datamodule(name, staging).prepare_data()  # checksums; raises before anything is moved
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return target


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Turn SIGTERM (`kill`, a job scheduler's timeout) into SystemExit, so staging folders are removed
    as on Ctrl-C; only SIGKILL leaves one behind (and the next run removes it)."""

    def _exit(signum: int, frame) -> None:
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, _exit)
    except ValueError:  # not the main thread: keep the default
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "dataset",
        choices=("status", *MOGONET, "avmnist", "nyuv2"),
        help="'status', or the dataset to prepare",
    )
    p.add_argument(
        "--quick", action="store_true", help="status: check presence only, no checksums (AV-MNIST is 1.1 GB)"
    )
    p.add_argument(
        "--from",
        dest="source",
        type=Path,
        help="local folder holding the original files (nyuv2: the file nyu_depth_v2_labeled.mat)",
    )
    p.add_argument(
        "--splits", type=Path, help="nyuv2: split .mat (trainNdxs, testNdxs); default: splits.mat in --meta"
    )
    p.add_argument(
        "--meta",
        type=Path,
        default=META_DIR,
        help="nyuv2: folder with classMapping40.mat and class13Mapping.mat (default: the shipped data/nyuv2)",
    )
    p.add_argument("--mnist", type=Path, help="avmnist: folder with the four MNIST IDX files (.gz or raw)")
    p.add_argument("--fsdd", type=Path, help="avmnist: FSDD folder holding recordings/")
    p.add_argument("--seed", type=int, default=0, help="avmnist: clip shuffle and noise seed (default 0)")
    p.add_argument(
        "--noise-snr-db", type=float, default=10.0, help="avmnist: white-noise SNR in dB (default 10)"
    )
    p.add_argument("--verify", action="store_true", help="only verify the files already in place")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="data root (default: paths.data_dir, i.e. $FUSIONBENCH_DATA_DIR or data/)",
    )
    args = p.parse_args()
    if args.dataset == "status":
        text, rows = status(args.data_dir, quick=args.quick)
        print(text)
        sys.exit(1 if any(r.state == "error" for r in rows) else 0)  # data states never fail the command
    root = data_root(args.data_dir)
    try:
        with sigterm_unwinds():
            if args.dataset == "avmnist" and (args.mnist or args.fsdd or args.source):
                if not (args.mnist and args.fsdd) or args.source:
                    raise FusionbenchError(
                        "avmnist is built, not imported: give both --mnist DIR and --fsdd DIR "
                        "(and no --from)."
                    )
                start = time.perf_counter()
                target = build_avmnist(
                    args.mnist.expanduser(),
                    args.fsdd.expanduser(),
                    root,
                    seed=args.seed,
                    noise_snr_db=args.noise_snr_db,
                    log=lambda msg: print(f"avmnist: {msg}", flush=True),
                )
                print(f"avmnist: built into {target} in {time.perf_counter() - start:.0f} s")
            elif args.dataset == "nyuv2" and args.source:
                start = time.perf_counter()
                target = prepare_nyuv2(
                    args.source.expanduser(),
                    root,
                    splits=args.splits.expanduser() if args.splits else None,
                    meta_dir=args.meta.expanduser(),
                    log=lambda msg: print(f"nyuv2: {msg}", flush=True),
                )
                dm = datamodule("nyuv2", target)
                dm.num_samples = {}  # a custom --splits has its own sizes
                dm.prepare_data()  # the layout as the loader sees it, SHA256SUMS included
                print(f"nyuv2: prepared into {target} in {time.perf_counter() - start:.0f} s")
            elif args.source:
                target = import_mogonet(args.dataset, args.source.expanduser(), root)
                print(f"{args.dataset}: imported and verified into {target}")
            else:
                dm = datamodule(args.dataset, root / args.dataset)
                dm.prepare_data()
                print(f"{args.dataset}: all files present and matching their checksums in {dm.data_dir}")
    except FusionbenchError as e:
        print(f"prepare_data: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
