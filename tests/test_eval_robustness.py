"""Robustness curves of finished runs (scripts/eval_robustness.py): measured on the tested checkpoint, read
back by the table collector only for that checkpoint, rendered per row curve (RGB-D: rgb, depth, either)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import FAST

from fusionbench import ROOT
from fusionbench.tables.build import TableSpec
from fusionbench.tables.collect import collect_runs
from fusionbench.tables.robustness import robustness_markdown, robustness_rows
from fusionbench.train import train

GRID = ["--set", "levels=[0.0,1.0]", "--set", "seeds=[0,1]"]


def script():
    spec = importlib.util.spec_from_file_location("eval_robustness", ROOT / "scripts" / "eval_robustness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A trained ESANet-small on synthetic RGB-D in a results/runs/<experiment>/seed=0 folder."""
    from conftest import compose_cfg

    root = tmp_path_factory.mktemp("rob")
    folder = root / "runs" / "esa" / "seed=0"
    cfg = compose_cfg(
        [
            "dataset=rgbd_synthetic",
            "fusion=esanet",
            "fusion.decoder_channels=[16,16,16]",
            "fusion.decoder_blocks=[1,1,1]",
            "dataset.num_samples={train: 8, val: 4, test: 6}",
            "experiment_name=esa",
            *FAST,
        ],
        folder,
    )
    train(cfg)
    return root, folder


def test_curves_are_measured_on_the_tested_checkpoint_and_collected(finished_run):
    root, folder = finished_run
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "eval_robustness.py"), "--grid", "rgbd", *GRID, str(folder)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads((folder / "robustness.json").read_text())
    record = json.loads((folder / "metrics.json").read_text())
    assert measured["checkpoint"] == record["test_checkpoint"] and measured["grid"] == "rgbd"
    rob = measured["robustness"]
    assert rob["levels"] == [0.0, 1.0] and rob["seeds"] == [0, 1] and rob["probability"] == 0.33
    assert set(rob["curves"]) == {"rgb", "depth", "either"}
    clean = rob["curves"]["rgb"]["metrics"]["miou"][0]
    assert clean == pytest.approx(record["metrics"]["test/miou"], abs=1e-6)  # level 0 = the clean test split
    frame = collect_runs([root / "runs"])
    assert (
        frame.loc[0, "robustness"]["curves"]["depth"]["metrics"]["miou"]
        == rob["curves"]["depth"]["metrics"]["miou"]
    )


def test_curves_of_another_checkpoint_are_not_used(finished_run, tmp_path):
    root, folder = finished_run
    other = tmp_path / "runs" / "esa" / "seed=0"
    other.mkdir(parents=True)
    record = json.loads((folder / "metrics.json").read_text())
    (other / "metrics.json").write_text(json.dumps(record))
    (other / "robustness.json").write_text(
        json.dumps({"checkpoint": "epoch999.ckpt", "robustness": {"x": 1}})
    )
    assert collect_runs([tmp_path / "runs"]).loc[0, "robustness"] is None


def test_a_table_reads_one_curve_per_row(finished_run, tmp_path):
    root, folder = finished_run
    if not (folder / "robustness.json").exists():
        script().evaluate_run(folder, script().grid_config("rgbd", ["levels=[0.0,1.0]", "seeds=[0,1]"]))
    table = tmp_path / "t.yaml"
    table.write_text(
        "name: t\ntitle: T\nkind: robustness\nrobust_metric: miou\nseeds: 1\nruns: []\n"
        "baseline: {rgb: esa, depth: esa}\ncommand: x\nmetrics: [{key: test/miou, label: mIoU}]\n"
        "rows:\n  - {label: A, group: rgb, curve: rgb, experiment: esa}\n"
        "  - {label: A, group: depth, curve: depth, experiment: esa}\n"
    )
    spec = TableSpec.load(table)
    rows, grid, skipped = robustness_rows(spec, collect_runs([root / "runs"]))
    assert not skipped and grid["seeds"] == [0, 1]
    rob = json.loads((folder / "robustness.json").read_text())["robustness"]["curves"]
    assert rows[0]["mean_curve"] == rob["rgb"]["metrics"]["miou"]
    assert rows[1]["mean_curve"] == rob["depth"]["metrics"]["miou"]
    assert rows[0]["tau"][0] == 0.0  # each row against the baseline's curve of its own group
    text = robustness_markdown(spec, rows, grid, skipped)
    assert "noise seeds [0, 1]" in text and "probability 0.33" in text
