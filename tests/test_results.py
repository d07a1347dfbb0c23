"""The table builder on fixture run folders: aggregation, missing runs, reported columns, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fusionbench import ROOT
from fusionbench.tables import TableSpec, build_tables, collect_runs, update_readme
from fusionbench.tables.build import README_END, README_START


def write_run(root: Path, experiment: str, seed: int, acc: float, status: str = "complete", **extra) -> Path:
    folder = root / "results" / "runs" / experiment / f"seed={seed}"
    folder.mkdir(parents=True)
    record = {
        "status": status,
        "experiment_name": experiment,
        "seed": seed,
        "metrics": {"test/acc": acc},
        "wall_time_s": 2.0,
        **extra,
    }
    (folder / "metrics.json").write_text(json.dumps(record))
    return folder


TABLE = """
name: demo
title: Demo table
seeds: 3
metrics:
  - {key: test/acc, label: Acc, scale: 100, digits: 1}
rows:
  - {label: Base, experiment: demo_base, reported: {test/acc: 0.8}}
  - {label: Method, experiment: demo_method}
  - {label: Never run, experiment: demo_missing}
"""


@pytest.fixture
def project(tmp_path) -> Path:
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "demo.yaml").write_text(TABLE)
    for seed, acc in enumerate([0.70, 0.80, 0.90]):
        write_run(tmp_path, "demo_base", seed, acc)
    write_run(tmp_path, "demo_method", 0, 0.5)
    write_run(tmp_path, "demo_method", 1, 0.6)
    write_run(tmp_path, "demo_method", 2, 0.99, status="running")  # unfinished: never counted
    write_run(tmp_path, "demo_method", 3, 0.99, fast_dev_run=True)  # debug: never counted
    write_run(tmp_path, "demo_method", 5, 0.99, tags=["debug"])  # debug=limit: never counted
    (tmp_path / "results" / "runs" / "demo_method" / "seed=4").mkdir()  # crashed before any record
    return tmp_path


def test_collect_skips_unfinished_and_debug_runs(project, caplog):
    runs = collect_runs([project / "results" / "runs"])
    assert "seed=5 is a debug run" in caplog.text
    assert sorted(zip(runs.experiment_name, runs.seed)) == [
        ("demo_base", 0),
        ("demo_base", 1),
        ("demo_base", 2),
        ("demo_method", 0),
        ("demo_method", 1),
    ]


def test_table_values_missing_rows_and_reported_columns(project):
    md = build_tables(project / "tables", project / "out", project)["demo"]
    lines = md.splitlines()
    assert "| Method | runs | Acc | Acc (reported) |" in lines
    # mean 80.0, sample std of (70, 80, 90) = 10.0; reported 80.0 in its own column
    assert "| Base | 3/3 | 80.0 ± 10.0 | 80.0 |" in lines
    # std of (50, 60) = 7.07
    assert "| Method | 2/3 | 55.0 ± 7.1 | — |" in lines
    assert "| Never run | 0/3 | — | — |" in lines  # kept, never silently dropped
    assert "python train.py experiment=demo_missing sweep=seeds" in md
    assert "Method: 2/3" in md and "not measured by us" in md
    csv = (project / "out" / "demo.csv").read_text().splitlines()
    assert csv[1].startswith("Base,demo_base,3,3,0.8,0.1,0.8")
    tex = (project / "out" / "demo.tex").read_text()
    assert r"80.0 $\pm$ 10.0" in tex and r"\begin{tabular}{lrrr}" in tex


def test_rebuild_is_byte_identical(project):
    build_tables(project / "tables", project / "out", project)
    first = {p.name: p.read_bytes() for p in (project / "out").iterdir()}
    build_tables(project / "tables", project / "out", project)
    assert first == {p.name: p.read_bytes() for p in (project / "out").iterdir()}


def test_duplicate_seed_counts_once(project):
    other = project / "results" / "runs" / "zz_copy"
    write_run(other, "demo_base", 0, 0.1)
    runs = collect_runs([project / "results" / "runs"])
    base = runs[runs.experiment_name == "demo_base"]
    assert len(base) == 3


def test_readme_block_is_replaced(project, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_START}\nold\n{README_END}\noutro\n")
    assert update_readme(readme, {"demo": "### new\n"})
    assert readme.read_text() == f"intro\n{README_START}\n### new\n{README_END}\noutro\n"
    assert not update_readme(readme, {"demo": "### new\n"})


def test_table_spec_rejects_unknown_keys(tmp_path):
    (tmp_path / "bad.yaml").write_text(TABLE + "colums: []\n")
    with pytest.raises(ValueError, match=r"unknown keys \['colums'\]"):
        TableSpec.load(tmp_path / "bad.yaml")


def test_shipped_tables_match_committed_records(tmp_path):
    """`make tables` on a clean clone regenerates the committed results/ files exactly."""
    rendered = build_tables(ROOT / "configs" / "tables", tmp_path, ROOT)
    for name in rendered:
        for path in tmp_path.glob(f"{name}.*"):
            assert path.read_bytes() == (ROOT / "results" / path.name).read_bytes(), path.name
    readme = tmp_path / "README.md"
    readme.write_bytes((ROOT / "results" / "README.md").read_bytes())
    assert not update_readme(readme, rendered), "results/README.md is stale: run `make tables`"


def test_convergence_table_and_figures(tmp_path):
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "conv.yaml").write_text(
        "name: conv\nkind: convergence\ntitle: Conv\nseeds: 2\nsteps: [1, 3]\nreported_source: paper\n"
        "rows:\n  - {label: DEQ, experiment: e_deq, reported: {1: 0.5, 3: 0.01}}\n"
        "  - {label: Tied, experiment: e_tied, trace: iteration_rel_diff}\n"
    )
    for seed, scale in enumerate([1.0, 3.0]):
        folder = write_run(tmp_path, "e_deq", seed, 0.5)
        diag = {
            "solver_rel_residual": [0.2 * scale, None, 0.002 * scale],
            "iteration_rel_diff": [1, 1, 1],
            "gate_share": {"a": [0.25, 0.5, 0.5], "b": [0.75, 0.5, 0.5]},
        }
        (folder / "diagnostics.json").write_text(json.dumps(diag))
    md = build_tables(tmp_path / "tables", tmp_path / "out", tmp_path)["conv"]
    assert (
        "| DEQ | solver_rel_residual | 2/2 | 4.00e-01 | 4.00e-03 |" in md
    )  # means of (0.2, 0.6), (0.002, 0.006)
    assert "| DEQ (reported: paper) | solver_rel_residual |  | 5.00e-01 | 1.00e-02 |" in md
    assert "| Tied | iteration_rel_diff | 0/2 | — | — |" in md and "e_tied" in md
    assert (tmp_path / "out" / "conv.png").stat().st_size > 1000
    assert (tmp_path / "out" / "conv_gates.png").stat().st_size > 1000


TRADEOFF = """
name: trade
title: Trade-off
seeds: 2
metrics:
  - {key: test/acc, label: Acc, scale: 100, digits: 1}
  - {key: madds, label: MAdds, digits: 0}
  - {key: test/dynmm/madds, label: "E[MAdds]", digits: 0}
  - {key: test/dynmm/share_uni, label: share uni, digits: 2}
  - {key: test/dynmm/share_late, label: share late, digits: 2}
tradeoff:
  x: test/dynmm/madds
  x_fallback: madds
  x_scale: 1.0e-3
  y: test/acc
  y_scale: 100
  shares: {test/dynmm/share_uni: uni, test/dynmm/share_late: late}
rows:
  - {label: Static, experiment: t_static}
  - {label: "lam 0", experiment: t_lam0, lambda: 0}
  - {label: "lam 1", experiment: t_lam1, lambda: 1}
  - {label: "lam 0.1", experiment: t_lam01, lambda: 0.1}
"""


def test_tradeoff_points_follow_the_table_and_the_figure_is_written(tmp_path):
    from fusionbench.tables.build import aggregate
    from fusionbench.tables.tradeoff import tradeoff_points

    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "trade.yaml").write_text(TRADEOFF)
    for seed in (0, 1):
        write_run(tmp_path, "t_static", seed, 0.7 + 0.1 * seed, compute={"madds": 1000.0})
        for name, share in (("t_lam0", 0.0), ("t_lam01", 0.5), ("t_lam1", 1.0)):
            folder = write_run(tmp_path, name, seed, 0.9 - 0.2 * share, compute={"madds": 2000.0})
            record = json.loads((folder / "metrics.json").read_text())
            # E[MAdds] = share_uni * 100 + share_late * 1000 (+ seed so that x has a spread)
            record["metrics"].update(
                {
                    "test/dynmm/share_uni": share,
                    "test/dynmm/share_late": 1 - share,
                    "test/dynmm/madds": share * 100 + (1 - share) * 1000 + seed,
                }
            )
            (folder / "metrics.json").write_text(json.dumps(record))
    md = build_tables(tmp_path / "tables", tmp_path / "out", tmp_path)["trade"]
    assert (tmp_path / "out" / "trade.png").stat().st_size > 0
    assert "Figure `results/trade.png`" in md
    spec = TableSpec.load(tmp_path / "tables" / "trade.yaml")
    points = {
        p["label"]: p
        for p in tradeoff_points(spec, aggregate(spec, collect_runs([tmp_path / "results" / "runs"])))
    }
    # static row: no E[MAdds], so x falls back to the record's MAdds (1000 -> 1.0 k); acc mean of 70 and 80
    assert points["Static"]["lambda"] is None and points["Static"]["x"] == pytest.approx(1.0)
    assert points["Static"]["y"] == pytest.approx(75.0) and points["Static"]["y_std"] == pytest.approx(
        50**0.5
    )
    # lam 0.1: share 0.5 -> E[MAdds] mean (550 + 551) / 2 = 550.5 -> 0.5505 k, std 0.707 / 1000
    assert points["lam 0.1"]["lambda"] == 0.1
    assert points["lam 0.1"]["x"] == pytest.approx(0.5505) and points["lam 0.1"]["x_std"] == pytest.approx(
        0.5**0.5 / 1000
    )
    assert points["lam 1"]["shares"]["test/dynmm/share_uni"] == (1.0, 0.0)


def test_tradeoff_block_is_checked(tmp_path):
    bad = TRADEOFF.replace("\n  y: test/acc", "\n  y: test/f1")
    (tmp_path / "bad.yaml").write_text(bad)
    with pytest.raises(ValueError, match=r"tradeoff keys \['test/f1'\] are not among the table's metrics"):
        TableSpec.load(tmp_path / "bad.yaml")
    (tmp_path / "bad.yaml").write_text(TRADEOFF.replace("lambda: 1}", "lambda: high}"))
    with pytest.raises(ValueError, match=r"rows \['lam 1'\] have a non-numeric `lambda`"):
        TableSpec.load(tmp_path / "bad.yaml")
    (tmp_path / "bad.yaml").write_text(TRADEOFF.replace("  y_scale: 100", "  y_scael: 100"))
    with pytest.raises(ValueError, match=r"tradeoff has unknown keys \['y_scael'\]"):
        TableSpec.load(tmp_path / "bad.yaml")


def test_rows_tested_on_unconverged_deq_solves_or_early_checkpoints_are_flagged(tmp_path):
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "demo.yaml").write_text(TABLE)
    converged = {"deq_solver": {"test_forward": {"solves": 10, "converged": 1.0, "rel_residual": 1e-4}}}
    write_run(tmp_path, "demo_base", 0, 0.8, **converged, best_val={"epoch": 40}, epochs_trained=90)
    write_run(
        tmp_path,
        "demo_base",
        1,
        0.8,
        deq_solver={"test_forward": {"solves": 10, "converged": 0.7}},
        best_val={"epoch": 2},
        epochs_trained=60,
    )  # unconverged at test, and selected at epoch 2 of 60
    write_run(
        tmp_path, "demo_method", 0, 0.6, metrics={"test/acc": 0.6, "test/deq/rel_residual": 0.25}
    )  # old record
    write_run(
        tmp_path, "demo_method", 1, 0.6, best_val={"epoch": 2}, epochs_trained=3
    )  # short run: not flagged
    md = build_tables(tmp_path / "tables", tmp_path / "out", tmp_path)["demo"]
    lines = md.splitlines()
    assert "| Base † | 2/3 | 80.0 ± 0.0 | 80.0 |" in lines  # flagged, still averaged in, never dropped
    assert "| Method † | 2/3 | 60.0 ± 0.0 | — |" in lines
    assert "Tested on unconverged DEQ solves" in md and "Base: seeds 1; Method: seeds 0." in md
    assert "Checkpoints selected before epoch 10 of runs that trained 3x longer: Base: seeds 1." in md


def test_a_cited_row_shows_the_paper_numbers_and_asks_for_no_run(tmp_path):
    """`cited: true` rows (a paper's method with no code here): the reported numbers, `cited` for runs, no
    command to fill them, and a note naming them."""
    import pandas as pd
    import yaml

    from fusionbench.tables.build import aggregate, to_markdown

    raw = {
        "name": "t",
        "title": "T",
        "seeds": 2,
        "runs": ["runs"],
        "command": "python train.py experiment={experiment}",
        "reported_source": "Some paper",
        "metrics": [{"key": "test/acc", "label": "Acc", "scale": 100, "digits": 1}],
        "rows": [
            {"label": "Ours", "experiment": "ours", "reported": {"test/acc": 0.5}},
            {"label": "Theirs", "cited": True, "reported": {"test/acc": 0.612}},
        ],
    }
    spec_file = tmp_path / "t.yaml"
    spec_file.write_text(yaml.safe_dump(raw))
    spec = TableSpec.load(spec_file)
    md = to_markdown(spec, aggregate(spec, pd.DataFrame()))
    assert "| Theirs | cited | — | 61.2 |" in md
    assert "Cited rows (Theirs)" in md and "experiment=ours" in md and "experiment=None" not in md
    raw["rows"][1]["experiment"] = "theirs"  # a cited row runs nothing, so it names no experiment
    spec_file.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="a cited row"):
        TableSpec.load(spec_file)


def test_make_tables_names_the_records_git_does_not_track(tmp_path):
    """Tables rendered from an uncommitted record would not match main's records: make_tables says so."""
    import subprocess
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import make_tables
    finally:
        sys.path.pop(0)

    assert make_tables.uncommitted_records(tmp_path) == []  # not a git checkout: nothing to say
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    committed = write_run(tmp_path, "demo_base", 0, 0.8)
    subprocess.run([*git, "add", "."], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "base"], cwd=tmp_path, check=True)
    write_run(tmp_path, "demo_method", 0, 0.9)
    (committed / "last.ckpt").write_text("")  # not a record
    assert make_tables.uncommitted_records(tmp_path) == ["results/runs/demo_method/seed=0/metrics.json"]


RUNS_TABLE = """
name: per_seed
kind: runs
title: Per seed
seeds: 3
command: python train.py experiment={experiment} sweep=seeds
metrics:
  - {key: test/acc, label: Acc, scale: 100, digits: 1}
  - {key: test/f1, label: F1, digits: 2}
rows:
  - {label: Base, experiment: r_base}
  - {label: Pro, experiment: r_pro, baseline: r_base}
  - {label: Last, experiment: r_last}
"""


def test_runs_table_lists_every_seed_with_its_epoch_and_the_paired_difference(tmp_path):
    """`kind: runs`: a line per expected seed (missing ones kept, with the command that makes them), the
    tested epoch counted from 1 (from the checkpoint's name where validation chose none), and Δ of the first
    metric against the base run of the same seed only."""
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "per_seed.yaml").write_text(RUNS_TABLE)
    for seed, acc in enumerate([0.70, 0.80, 0.90]):
        write_run(tmp_path, "r_base", seed, acc, best_val={"epoch": seed}, epochs_trained=4)
    write_run(tmp_path, "r_pro", 0, 0.75, best_val={"epoch": 3}, epochs_trained=4, metrics={"test/acc": 0.75})
    write_run(tmp_path, "r_pro", 2, 0.85, epochs_trained=4, metrics={"test/acc": 0.85, "test/f1": 0.5})
    write_run(tmp_path, "r_last", 0, 0.6, epochs_trained=3, test_checkpoint="epoch002.ckpt")  # monitor: null
    write_run(tmp_path, "r_pro", 3, 0.99)  # beyond `seeds`: not shown
    md = build_tables(tmp_path / "tables", tmp_path / "out", tmp_path)["per_seed"]
    lines = md.splitlines()
    assert "| Method | seed | Acc | F1 | Δ Acc vs base, same seed | tested epoch | s/run |" in lines
    assert "| Base | 1 | 80.0 | — | — | 2 of 4 | 2 |" in lines
    assert "| Pro | 0 | 75.0 | — | +5.0 | 4 of 4 | 2 |" in lines  # 75 - 70, not 75 - mean(base)
    assert "| Pro | 1 | — | — | — | — | — |" in lines  # no run: kept as a line
    assert "| Pro | 2 | 85.0 | 0.50 | -5.0 | — | 2 |" in lines  # 85 - 90; no best_val in the record
    assert "| Last | 0 | 60.0 | — | — | 3 of 3, no selection | 2 |" in lines
    assert not any(line.startswith("| Pro | 3 ") for line in lines)
    assert (
        "Seeds without a run: `python train.py experiment=r_pro sweep=seeds seed=1`; "
        "`python train.py experiment=r_last sweep=seeds seed=1,2`"
    ) in md
    assert "Δ: the row's Acc minus its base run's at the same seed (Pro − Base)." in lines
    csv = (tmp_path / "out" / "per_seed.csv").read_text().splitlines()
    assert (
        csv[0]
        == "label,experiment,seed,test/acc,test/f1,delta,tested_epoch,selected,epochs_trained,wall_time_s"
    )
    assert csv[4] == "Pro,r_pro,0,0.75,,0.05,4,1,4,2"
    assert csv[7] == "Last,r_last,0,0.6,,,3,0,3,2"
    assert not (tmp_path / "out" / "per_seed.tex").exists()


def test_runs_table_history_columns_show_every_epoch_from_the_record_or_its_csv_readback(tmp_path):
    """`history: [train/loss]`: the value after each epoch from the record's own history; a history.json
    (read back from an older run's CSV log) stands in only for a record without one; '?' marks an epoch
    without the value, a dash a run without any history."""
    (tmp_path / "tables").mkdir()
    spec = RUNS_TABLE.replace("rows:", "history: [train/loss]\nrows:")
    (tmp_path / "tables" / "per_seed.yaml").write_text(spec)
    own = [{"epoch": 0, "train/loss": 1.0, "val/loss": 0.9}, {"epoch": 1, "train/loss": 0.5}]
    write_run(tmp_path, "r_base", 0, 0.7, history=own, epochs_trained=2)
    resumed = [{"epoch": 0, "train/loss": 1.25}, {"epoch": 1, "val/loss": 0.8, "resumed": True}]
    write_run(tmp_path, "r_base", 1, 0.7, history=resumed, epochs_trained=2)
    old = write_run(tmp_path, "r_base", 2, 0.7, epochs_trained=1)
    (old / "history.json").write_text(json.dumps({"history": [{"epoch": 0, "train/loss": 0.25}]}))
    both = write_run(tmp_path, "r_pro", 0, 0.7, history=[{"epoch": 0, "train/loss": 2.0}], epochs_trained=1)
    (both / "history.json").write_text(json.dumps({"history": [{"epoch": 0, "train/loss": 9.0}]}))
    write_run(tmp_path, "r_last", 0, 0.6, epochs_trained=1)  # neither
    md = build_tables(tmp_path / "tables", tmp_path / "out", tmp_path)["per_seed"]
    lines = md.splitlines()
    assert (
        "| Method | seed | Acc | F1 | Δ Acc vs base, same seed | train/loss by epoch | tested epoch | s/run |"
        in lines
    )
    assert "| Base | 0 | 70.0 | — | — | 1.000, 0.500 | — | 2 |" in lines
    assert "| Base | 1 | 70.0 | — | — | 1.250, ? | — | 2 |" in lines
    assert "| Base | 2 | 70.0 | — | — | 0.250 | — | 2 |" in lines
    assert "| Pro | 0 | 70.0 | — | +0.0 | 2.000 | — | 2 |" in lines  # the record's own history wins
    assert "| Last | 0 | 60.0 | — | — | — | — | 2 |" in lines
    assert "train/loss by epoch: the run's epoch means after epochs 1, 2, ..." in md
    csv = (tmp_path / "out" / "per_seed.csv").read_text().splitlines()
    assert csv[0].split(",")[5] == "train/loss by epoch" and csv[1].split(",")[5] == "1;0.5"
    assert csv[2].split(",")[5] == "1.25;?"
    bad = RUNS_TABLE.replace("kind: runs", "kind: metrics").replace("rows:", "history: [train/loss]\nrows:")
    (tmp_path / "bad.yaml").write_text(bad)
    with pytest.raises(ValueError, match="`history` columns belong to runs tables"):
        TableSpec.load(tmp_path / "bad.yaml")


def test_runs_table_rejects_reported_numbers(tmp_path):
    bad = RUNS_TABLE.replace("experiment: r_base}", "experiment: r_base, reported: {test/acc: 0.8}}")
    (tmp_path / "bad.yaml").write_text(bad)
    with pytest.raises(ValueError, match="a runs table needs `metrics`.*no `reported` numbers"):
        TableSpec.load(tmp_path / "bad.yaml")


def test_deq_test_converged_reads_the_solver_entry_then_the_logged_metrics():
    from fusionbench.tables.collect import deq_test_converged

    assert deq_test_converged({"deq_solver": {"test_forward": {"converged": 0.9}}}) == 0.9
    # a ddp_spawn run of before the fallback: an empty test_forward beside the logged share
    spawned = {"deq_solver": {"test_forward": {}}, "metrics": {"test/deq/f_converged": 0.6}}
    assert deq_test_converged(spawned) == 0.6
    assert deq_test_converged({"metrics": {"test/deq/f_failed": 0.25}}) == 0.75
    assert deq_test_converged({"metrics": {"test/deq/rel_residual": 0.25}}) == 0.0  # old: beyond 0.1
    assert deq_test_converged({"metrics": {"test/acc": 0.5}}) is None  # no DEQ fusion
