"""Regenerate every table under configs/tables/ from the run records on disk, and the block of
results/README.md.

python scripts/make_tables.py  # all tables -> results/<name>.{md,csv,tex}, results/README.md updated
python scripts/make_tables.py --only baselines_rosmap --no-readme
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from fusionbench import ROOT
from fusionbench.tables import build_tables, update_readme


def uncommitted_records(root: Path) -> list[str]:
    """Record files under ``root``/results/runs that git does not track (and does not ignore): the tables
    just rendered include them, so committing the tables without them leaves main's tables out of step with
    main's records. Empty outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--others", "--exclude-standard", "--", "results/runs"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [line for line in out.splitlines() if line.endswith(".json")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", type=Path, default=ROOT / "configs" / "tables", help="folder of table YAMLs")
    p.add_argument("--out", type=Path, default=ROOT / "results", help="where the rendered tables go")
    p.add_argument("--root", type=Path, default=ROOT, help="folder the tables' run paths are relative to")
    p.add_argument("--only", nargs="*", help="table names to render (default: all)")
    p.add_argument(
        "--no-readme", action="store_true", help="do not rewrite the tables block of results/README.md"
    )
    args = p.parse_args()
    rendered = build_tables(args.tables, args.out, args.root, args.only)
    for name in sorted(rendered):
        print(f"wrote {args.out / name}.*")
    if not args.no_readme and not args.only:
        changed = update_readme(args.out / "README.md", rendered)
        print(f"{args.out / 'README.md'} tables block " + ("updated" if changed else "unchanged"))
    loose = uncommitted_records(args.root)
    if loose:
        print(
            f"note: {len(loose)} record file(s) that git does not track went into these tables; commit them"
        )
        print("with the tables, or main's tables will not match main's records:")
        print("\n".join(f"  {path}" for path in loose))


if __name__ == "__main__":
    main()
