"""Import and verify local copies of datasets. Never downloads anything.

    python scripts/prepare_data.py brca --from ~/Downloads/MOGONET/BRCA   # copy + verify into data/brca
    python scripts/prepare_data.py rosmap --verify                        # check what is in data/rosmap
    python scripts/prepare_data.py avmnist --mnist ../shared/data/mnist --fsdd ../shared/data/fsdd  # build

Files are copied into a temporary folder beside the target and moved into place only when every
file is present and matches its published checksum, so a failed import leaves nothing half-written.
AV-MNIST is built (not copied) from MNIST + FSDD the same way; see fusionbench/data/avmnist_build.py.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import OmegaConf

from fusionbench import ROOT
from fusionbench.data.avmnist_build import build_avmnist
from fusionbench.errors import FusionbenchError

MOGONET = ("brca", "rosmap")


def datamodule(name: str, data_dir: Path):
    cfg = OmegaConf.load(ROOT / "configs" / "dataset" / f"{name}.yaml")
    cfg.data_dir = str(data_dir)
    return instantiate(cfg, _convert_="all")


def import_mogonet(name: str, source: Path, data_root: Path) -> Path:
    target = data_root / name
    probe = datamodule(name, source)
    missing = [f for f in probe.required_files() if not (source / f).is_file()]
    if missing:
        raise FusionbenchError(
            f"{source} lacks {', '.join(missing)}; point --from at the {name.upper()}/ folder of MOGONET."
        )
    data_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_root, prefix=f".{name}-") as tmp:
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=(*MOGONET, "avmnist"))
    p.add_argument("--from", dest="source", type=Path, help="local folder holding the original files")
    p.add_argument("--mnist", type=Path, help="avmnist: folder with the four MNIST IDX files (.gz or raw)")
    p.add_argument("--fsdd", type=Path, help="avmnist: FSDD folder holding recordings/")
    p.add_argument("--seed", type=int, default=0, help="avmnist: clip shuffle and noise seed (default 0)")
    p.add_argument(
        "--noise-snr-db", type=float, default=10.0, help="avmnist: white-noise SNR in dB (default 10)"
    )
    p.add_argument("--verify", action="store_true", help="only verify the files already in place")
    p.add_argument("--data-dir", type=Path, default=ROOT / "data", help="data root (default: data/)")
    args = p.parse_args()
    try:
        if args.dataset == "avmnist" and (args.mnist or args.fsdd or args.source):
            if not (args.mnist and args.fsdd) or args.source:
                raise FusionbenchError(
                    "avmnist is built, not imported: give both --mnist DIR and --fsdd DIR (and no --from)."
                )
            start = time.perf_counter()
            target = build_avmnist(
                args.mnist.expanduser(),
                args.fsdd.expanduser(),
                args.data_dir,
                seed=args.seed,
                noise_snr_db=args.noise_snr_db,
                log=lambda msg: print(f"avmnist: {msg}", flush=True),
            )
            print(f"avmnist: built into {target} in {time.perf_counter() - start:.0f} s")
        elif args.source:
            target = import_mogonet(args.dataset, args.source.expanduser(), args.data_dir)
            print(f"{args.dataset}: imported and verified into {target}")
        else:
            dm = datamodule(args.dataset, args.data_dir / args.dataset)
            dm.prepare_data()
            print(f"{args.dataset}: all files present and matching their checksums in {dm.data_dir}")
    except FusionbenchError as e:
        print(f"prepare_data: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
