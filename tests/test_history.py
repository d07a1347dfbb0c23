"""Training curves in the run record: `EpochLog`'s per-epoch ``history``, the same curves read back from
a CSV log (`history_from_csv`, scripts/history_from_csv.py) for runs recorded before, and their use by
tables."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
from conftest import FAST

from fusionbench import ROOT
from fusionbench.loggers import history_from_csv
from fusionbench.tables.collect import collect_runs
from fusionbench.train import train


def test_the_record_holds_each_epochs_train_and_val_means_as_the_csv_log_does(make_cfg, caplog):
    cfg = make_cfg(["dataset=synthetic", "seed=1", *FAST, "trainer.max_epochs=3", "logger=csv"])
    with caplog.at_level(logging.INFO, logger="fusionbench"):
        result, _ = train(cfg)
    history = result["history"]
    assert [entry["epoch"] for entry in history] == [0, 1, 2]
    assert all({"train/loss", "val/loss", "train/acc", "val/acc"} <= set(entry) for entry in history)
    assert not any(key.startswith("test/") or key.endswith("_step") for entry in history for key in entry)
    assert history[0]["train/loss"] > history[2]["train/loss"]  # the synthetic task is learnable
    # the run's own CSV log says the same, value for value
    logged = history_from_csv(Path(cfg.paths.output_dir) / "csv" / "metrics.csv")
    assert logged == [pytest.approx(entry) for entry in history]
    # the best epoch's val/loss is the one the checkpoint was selected on
    best = result["best_val"]
    assert history[best["epoch"]]["val/loss"] == pytest.approx(best["value"])
    # each epoch's log line shows that epoch's training loss, not the one before
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert lines == [
        f"epoch {e}/3: train/loss={h['train/loss']:.4g}, val/loss={h['val/loss']:.4g}"
        for e, h in enumerate(history)
    ]


def test_an_epoch_checkpointed_before_its_training_means_is_marked_resumed():
    """A checkpoint written when validation ended holds that epoch's val/ values only."""
    from fusionbench.callbacks import EpochLog

    log = EpochLog()
    log.load_state_dict(
        {"history": [{"epoch": 0, "train/loss": 1.0, "val/loss": 0.9}, {"epoch": 1, "val/loss": 0.8}]}
    )
    assert log.record() == {
        "history": [
            {"epoch": 0, "train/loss": 1.0, "val/loss": 0.9},
            {"epoch": 1, "val/loss": 0.8, "resumed": True},
        ]
    }
    assert EpochLog().record() == {}  # an evaluation-only run trains no epoch
    # testing the selected checkpoint after fit restores its callback states: the history stays whole
    whole = [{"epoch": e, "train/loss": 1.0 - e / 10} for e in range(4)]
    log = EpochLog()
    log.history = [dict(e) for e in whole]
    log.load_state_dict({"history": whole[:2]})
    assert log.record() == {"history": whole}


CSV_LOG = """epoch,step,train/loss,val/loss,train/acc_step,test/loss
0,9,,0.9,,
0,9,1.0,,0.4,
1,19,,0.8,,
1,19,0.7,,0.5,
1,19,,0.85,,
1,19,0.75,,0.5,
2,29,,,,0.6
"""


def test_history_from_csv_keeps_the_finished_attempt_of_a_replayed_epoch(tmp_path):
    """Lightning writes validation and training means on separate rows; `fusionbench.loggers.CSVLogger`
    appends a resumed run's replayed epoch after the first attempt's; test rows are not training curves."""
    path = tmp_path / "metrics.csv"
    path.write_text(CSV_LOG)
    assert history_from_csv(path) == [
        {"epoch": 0, "train/loss": 1.0, "val/loss": 0.9},
        {"epoch": 1, "train/loss": 0.75, "val/loss": 0.85},
    ]


def test_backfill_writes_history_json_that_tables_read_and_skips_what_it_cannot_vouch_for(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import history_from_csv as script
    finally:
        sys.path.pop(0)

    def run(name: str, record: dict, log: str | None = CSV_LOG) -> Path:
        folder = tmp_path / "runs" / name / "seed=0"
        (folder / "csv").mkdir(parents=True)
        base = {"status": "complete", "experiment_name": name, "seed": 0, "metrics": {"test/acc": 0.5}}
        (folder / "metrics.json").write_text(json.dumps({**base, **record}))
        if log is not None:
            (folder / "csv" / "metrics.csv").write_text(log)
        return folder

    old = run("old", {"epochs_trained": 2})
    short = run("short", {"epochs_trained": 3})  # the log lacks an epoch the record trained
    own = run("own", {"epochs_trained": 1, "history": [{"epoch": 0, "train/loss": 2.0}]})
    cut = run("cut", {"epochs_trained": 2, "history": [{"epoch": 0, "train/loss": 3.0}]})  # lost epoch 1
    nolog = run("nolog", {"epochs_trained": 2}, log=None)
    assert script.main([str(p) for p in (old, short, own, nolog, cut)]) == 0
    out = capsys.readouterr().out
    assert "wrote history.json (2 epochs)" in out and "2 of 5 run(s) given a history" in out
    assert "the log has epochs [0, 1], the record trained 3" in out
    assert "the record has its own history" in out and "no csv/metrics.csv" in out
    written = json.loads((old / "history.json").read_text())
    assert written["source"] == "csv/metrics.csv" and written["history"][1]["train/loss"] == 0.75
    assert not any((p / "history.json").exists() for p in (short, own, nolog))
    runs = collect_runs([tmp_path / "runs"]).set_index("experiment_name")
    assert runs.loc["old", "history"] == written["history"]
    assert runs.loc["own", "history"] == [{"epoch": 0, "train/loss": 2.0}]
    assert runs.loc["short", "history"] is None
    assert runs.loc["cut", "history"] == written["history"]  # a record that lost epochs: the log completes it
