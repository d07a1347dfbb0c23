"""scripts/run_queue.py: table cells run side by side through train.py, records collected, finished cells
skipped, a deadline starts nothing new."""

from __future__ import annotations

import json
import subprocess
import sys

from fusionbench import ROOT

ROW = "pro_fig7_generative_base_eta0_sigma0.1"  # a generative row: seconds per run


def queue(tmp_path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts" / "run_queue.py"), *args, "--results", str(tmp_path / "res")]
    cmd += [
        "--logs",
        str(tmp_path / "logs"),
        "--",
        "trainer.max_epochs=1",
        "logger=none",
        "dataset.batch_size=512",
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_cells_run_in_parallel_are_collected_without_checkpoints_and_then_skipped(tmp_path):
    done = queue(tmp_path, ROW, "--seeds", "0-1", "--parallel", "2", "--collect", str(tmp_path / "out"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 cells, 0 with records, 2 to run" in done.stdout
    jobs = [json.loads(line) for line in (tmp_path / "logs" / "queue.jsonl").read_text().splitlines()]
    assert sorted((j["seed"], j["rc"]) for j in jobs) == [(0, 0), (1, 0)]
    for seed in (0, 1):
        record = json.loads((tmp_path / "res" / "runs" / ROW / f"seed={seed}" / "metrics.json").read_text())
        assert record["status"] == "complete" and record["seed"] == seed and record["epochs_trained"] == 1
        collected = tmp_path / "out" / "runs" / ROW / f"seed={seed}"
        assert json.loads((collected / "metrics.json").read_text()) == record
        assert (collected / ".hydra" / "config.yaml").is_file()
        assert not list(collected.rglob("*.ckpt"))
    again = queue(tmp_path, ROW, "--seeds", "0-2", "--deadline", "0")
    assert "3 cells, 2 with records, 1 to run" in again.stdout
    assert "deadline reached, 1 cells not started" in again.stdout
    assert not (tmp_path / "res" / "runs" / ROW / "seed=2" / "metrics.json").exists()


def test_a_pattern_matching_no_experiment_is_an_error(tmp_path):
    done = queue(tmp_path, "pro_t4_nosuch_*")
    assert done.returncode != 0
    assert "no declared experiment matches 'pro_t4_nosuch_*'" in done.stderr
