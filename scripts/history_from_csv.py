"""Training curves for runs recorded before records carried them: reads each run's own CSV log
(``csv/metrics.csv``, written by ``logger=csv``) and writes ``history.json`` into the run folder, which `make
tables` reads as the record's ``history`` (`fusionbench.tables.collect.attach_history`). The log is not
committed; the history is, so a claim about a run's training loss can be checked from the repository.

    python scripts/history_from_csv.py results/runs/pro_t4_*_eftransf_*/seed=*

A folder without a finished record or a CSV log, whose record has its own complete history, or whose log
does not cover every epoch the record trained, is reported and skipped. (Records written by dc1eea0..f03932d
kept only the epochs up to the tested checkpoint's; their CSV log completes them.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fusionbench.loggers import history_from_csv
from fusionbench.records import RECORD_NAME, write_json
from fusionbench.tables.collect import HISTORY_NAME, history_complete

CSV_LOG = Path("csv") / "metrics.csv"


def backfill(run: Path) -> str:
    """Writes ``run/history.json``; returns what was done (or why not), for the summary line."""
    record_path, log_path = run / RECORD_NAME, run / CSV_LOG
    if not record_path.is_file() or not log_path.is_file():
        return f"skipped: no {RECORD_NAME}" if not record_path.is_file() else f"skipped: no {CSV_LOG}"
    record = json.loads(record_path.read_text())
    if record.get("status") != "complete":
        return f"skipped: record status {record.get('status')!r}"
    if history_complete(record):
        return "skipped: the record has its own history"
    history = history_from_csv(log_path)
    epochs = [entry["epoch"] for entry in history]
    trained = record.get("epochs_trained")
    if trained is None or epochs != list(range(int(trained))):
        return f"skipped: the log has epochs {epochs}, the record trained {trained}"
    write_json(run / HISTORY_NAME, {"source": str(CSV_LOG), "history": history})
    return f"wrote {HISTORY_NAME} ({len(history)} epochs)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders (results/runs/<experiment>/seed=<n>)")
    args = p.parse_args(argv)
    done = 0
    for run in args.runs:
        outcome = backfill(run)
        done += outcome.startswith("wrote")
        print(f"{run}: {outcome}")
    print(f"{done} of {len(args.runs)} run(s) given a history")
    return 0


if __name__ == "__main__":
    sys.exit(main())
