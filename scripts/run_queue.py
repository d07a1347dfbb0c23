"""Run many table cells at once: every (experiment, seed) of the patterns given, ``--parallel`` training
processes side by side (one GPU runs several small models at once: Pro-Fusion's stock Transformers leave an
H200 almost idle), each ``python train.py experiment=<name> sweep=seeds seed=<n> <overrides>``.

    python scripts/run_queue.py 'pro_t4_*_lftransf_*' 'pro_t4_*_mult_*' --parallel 8 -- trainer=gpu
    python scripts/run_queue.py pro_t1_avmnist_mfm_base pro_t1_avmnist_mfm_pro --seeds 0-2 --parallel 2

Order: seed-major (every experiment at seed 0 first, so base and Pro-Fusion rows fill on the same seeds before
any row gets a second seed). A cell whose record exists is skipped (train.py's sweep skips it too, and resumes
an interrupted one from its last.ckpt). ``--deadline`` (seconds) starts no job after that time, so a
time-limited machine stops with whole runs; ``--collect DIR`` copies each finished run's record files
(metrics.json, robustness.json, ..., .hydra/config.yaml, overrides.yaml: what .gitignore lets through) to
DIR/runs/<experiment>/seed=<n>/, without checkpoints. Each job's output goes to ``--logs``; a line per job
(exit code, seconds) to stdout and ``<logs>/queue.jsonl``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECORD_FILES = (
    "metrics.json",
    "diagnostics.json",
    "linear_probe.json",
    "robustness.json",
    "epoch_tests.json",
)
HYDRA_FILES = (".hydra/config.yaml", ".hydra/overrides.yaml")


from fusionbench.records import RunRecord  # noqa: E402  (after the path insert)


def seeds(text: str) -> list[int]:
    """``0-4`` or ``0,2,5``."""
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",")]


def experiments(patterns: list[str]) -> list[str]:
    """The declared experiments (table rows and recipe files) matching each pattern, in pattern order."""
    from fusionbench.experiments import rows

    known = sorted(set(rows()) | {p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml")})
    out: list[str] = []
    for pattern in patterns:
        found = fnmatch.filter(known, pattern)
        if not found:
            raise SystemExit(f"run_queue: no declared experiment matches {pattern!r} (see configs/tables/).")
        out += [name for name in found if name not in out]
    return out


def run_dir(results: Path, experiment: str, seed: int) -> Path:
    return results / "runs" / experiment / f"seed={seed}"


def collect(src: Path, dst: Path) -> int:
    """Copy the record files of one run; the number copied."""
    n = 0
    for name in RECORD_FILES + HYDRA_FILES:
        if (src / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)
            n += 1
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("patterns", nargs="+", help="experiment names or fnmatch patterns")
    p.add_argument("--seeds", type=seeds, default=seeds("0-4"), help="0-4 or 0,2,5 (default 0-4)")
    p.add_argument("--parallel", type=int, default=2, help="training processes at once")
    p.add_argument("--threads", type=int, default=1, help="OMP/MKL threads per process")
    p.add_argument("--results", type=Path, default=ROOT / "results", help="paths.results_dir of the runs")
    p.add_argument("--collect", type=Path, default=None, help="copy finished runs' records here")
    p.add_argument("--deadline", type=float, default=None, help="start no job after this many seconds")
    p.add_argument("--logs", type=Path, default=Path("/tmp/run_queue"))
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    args, overrides = p.parse_known_args()
    overrides = [o for o in overrides if o != "--"]
    names = experiments(args.patterns)
    jobs = [(e, s) for s in args.seeds for e in names]
    todo = [(e, s) for e, s in jobs if not RunRecord(run_dir(args.results, e, s)).is_complete()]
    print(
        f"run_queue: {len(jobs)} cells, {len(jobs) - len(todo)} with records, {len(todo)} to run", flush=True
    )
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env.setdefault("WANDB_MODE", "offline")
    args.logs.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    running: dict[subprocess.Popen, tuple[str, int, float]] = {}
    failed = 0

    def finish(proc: subprocess.Popen) -> None:
        nonlocal failed
        experiment, seed, t0 = running.pop(proc)
        rc = proc.returncode
        failed += rc != 0
        record = {
            "experiment": experiment,
            "seed": seed,
            "rc": rc,
            "seconds": round(time.monotonic() - t0, 1),
        }
        if args.collect is not None and rc == 0:
            src = run_dir(args.results, experiment, seed)
            record["collected"] = collect(src, run_dir(args.collect, experiment, seed))
        print(json.dumps(record), flush=True)
        with open(args.logs / "queue.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    while todo or running:
        while todo and len(running) < args.parallel:
            if args.deadline is not None and time.monotonic() - start > args.deadline:
                print(f"run_queue: deadline reached, {len(todo)} cells not started: {todo}", flush=True)
                todo = []
                break
            experiment, seed = todo.pop(0)
            cmd = [
                args.python,
                str(ROOT / "train.py"),
                f"experiment={experiment}",
                "sweep=seeds",
                f"seed={seed}",
                f"paths.results_dir={args.results}",
                *overrides,
            ]
            if args.dry_run:
                print(" ".join(cmd))
                continue
            log = open(args.logs / f"{experiment}_seed{seed}.log", "w")
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            running[proc] = (experiment, seed, time.monotonic())
        for proc in [q for q in running if q.poll() is not None]:
            finish(proc)
        if running:
            time.sleep(1.0)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
