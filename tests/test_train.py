"""The run loop end to end: every fusion trains, records are written once, runs resume without
double counting, checkpoints evaluate, and bad runs stop with clear messages."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST, RGBD_FUSIONS, compose_cfg, token_aware
from nyuv2_fixture import nyuv2_fixture_dir
from omegaconf import OmegaConf

from fusionbench import ROOT
from fusionbench.errors import ConfigError, TrainingError
from fusionbench.train import train

FUSIONS = sorted(p.stem for p in (ROOT / "configs" / "fusion").glob("*.yaml"))


@pytest.mark.parametrize("fusion", token_aware(FUSIONS))
def test_fast_dev_run_every_fusion(fusion, make_cfg):
    extra = ["dataset.modalities=[image]"] if fusion == "unimodal" else []
    if fusion == "mi_matrix":  # a bilinear map of exactly two modalities
        extra = ["dataset.modalities=[image,text]"]
    if fusion.startswith("early_sequence") or fusion.startswith(
        "mult"
    ):  # stacks equal-length series (B, T, 1) along the feature axis
        extra = ["dataset.shapes={audio: [12, 1], image: [12, 1], text: [12, 1]}"]
    if fusion == "mfas":  # fuses intermediate LeNet layers: image-shaped inputs and the LeNet backbone
        extra = [
            "dataset.shapes={audio: [1, 112, 112], image: [1, 28, 28]}",
            "dataset.modalities=[audio,image]",
            "backbone=avmnist",
        ]
    dataset = "synthetic"
    if fusion in RGBD_FUSIONS:  # dense prediction on RGB-D images
        dataset, extra = "rgbd_synthetic", ["dataset.num_samples={train: 4, val: 2, test: 2}"]
    cfg = make_cfg(
        [f"dataset={dataset}", f"fusion={fusion}", "debug=fdr", "trainer.enable_progress_bar=false", *extra]
    )
    result, objs = train(cfg)
    assert objs["trainer"].global_step == 1
    if dataset == "rgbd_synthetic":
        assert {"test/miou", "test/pixel_acc", "test/macc", "test/cost/gmacs"} <= set(result["metrics"])
        return
    assert set(result["metrics"]) >= {
        "test/acc",
        "test/f1_macro",
        "test/f1_weighted",
        "test/auroc",
        "test/loss",
    }
    assert not os.path.exists(
        os.path.join(cfg.paths.output_dir, "metrics.json")
    )  # debug runs are not records


def test_training_learns_and_writes_a_complete_record(make_cfg):
    import torch

    cfg = make_cfg(["dataset=synthetic", "seed=3", *FAST, "trainer.max_epochs=15"])
    result, objs = train(cfg)
    with open(os.path.join(cfg.paths.output_dir, "metrics.json")) as f:
        record = json.load(f)
    assert record == json.loads(json.dumps(result))
    assert record["status"] == "complete" and record["seed"] == 3
    assert record["metrics"]["test/acc"] > 0.8  # chance is 1/3
    assert record["best_val"]["metric"] == "val/loss" and 0 <= record["best_val"]["epoch"] < 15
    assert record["params"]["total"] == sum(p.numel() for p in objs["task"].model.parameters())
    assert record["data"]["sizes"] == {"train": 256, "val": 64, "test": 64}
    assert record["git"]["sha"] is None or len(record["git"]["sha"]) == 40
    assert record["host"]["torch_threads"] == torch.get_num_threads() >= 1  # sets the float sum order
    assert record["test_checkpoint"].startswith("epoch")  # the best checkpoint, not the last weights


def test_git_state_names_the_edited_files(tmp_path):
    """ "dirty" alone cannot tell an edited caption from an edited model: the record lists the paths."""
    import subprocess

    from fusionbench.records import MAX_DIRTY_PATHS, git_state

    assert git_state(tmp_path) == {"sha": None, "dirty": None}  # not a checkout: unknown, not "clean"
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    names = [f"f{i:02d}.py" for i in range(MAX_DIRTY_PATHS + 5)]
    for name in names:
        (tmp_path / name).write_text("a")
    subprocess.run([*git, "add", "."], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "c"], cwd=tmp_path, check=True)
    state = git_state(tmp_path)
    assert len(state["sha"]) == 40 and state["dirty"] is False and state["dirty_paths"] == []
    assert state["dirty_count"] == 0
    (tmp_path / "new.txt").write_text("untracked files are not the code a run ran")
    (tmp_path / "f03.py").write_text("b")
    assert git_state(tmp_path)["dirty_paths"] == ["f03.py"] and git_state(tmp_path)["dirty"] is True
    for name in names:
        (tmp_path / name).write_text("c")
    state = git_state(tmp_path)
    assert state["dirty_paths"] == names[:MAX_DIRTY_PATHS]  # capped, sorted
    assert state["dirty_count"] == MAX_DIRTY_PATHS + 5  # the cap is visible, not silent


def test_wall_time_counts_training_once(make_cfg):
    """Testing the selected checkpoint restores it; its saved clock must not be added to the time again."""
    import time

    cfg = make_cfg(["dataset=synthetic", *FAST, "trainer.max_epochs=4"])
    start = time.time()
    result, _ = train(cfg)
    elapsed = time.time() - start
    assert result["test_checkpoint"].startswith("epoch")  # a checkpoint was restored for testing
    assert 0 < result["wall_time_s"] <= elapsed + 0.5


def interrupt_after(monkeypatch, epoch: int, signal_name: str = "INT") -> None:
    """The run stops as Ctrl-C would, once epoch ``epoch``'s last.ckpt is written (fusionbench.callbacks)."""
    monkeypatch.setenv("FUSIONBENCH_KILL_AFTER_EPOCH", str(epoch))
    monkeypatch.setenv("FUSIONBENCH_KILL_SIGNAL", signal_name)


def interrupted(cfg, monkeypatch, epoch: int) -> None:
    import signal

    interrupt_after(monkeypatch, epoch)
    handler = signal.getsignal(signal.SIGINT)
    # Ctrl-C's own handler, whatever an earlier test in this worker left (Lightning ignores SIGINT after an
    # interrupted fit; with SIGINT ignored the run would not stop and the test would depend on test order)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SystemExit):  # Lightning's graceful shutdown after a KeyboardInterrupt
            train(cfg)
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning leaves SIGINT ignored
        monkeypatch.delenv("FUSIONBENCH_KILL_AFTER_EPOCH")
    assert not os.path.exists(os.path.join(cfg.paths.output_dir, "metrics.json"))  # no record of half a run


def test_interrupted_run_resumes_and_finished_run_is_not_rerun(make_cfg, monkeypatch):
    cfg = make_cfg(["dataset=synthetic", *FAST, "trainer.max_epochs=5"], sub="table_run")
    interrupted(cfg, monkeypatch, epoch=2)  # after epochs 0-2
    resumed, objs = train(cfg)
    steps_per_epoch = objs["trainer"].num_training_batches
    assert objs["trainer"].global_step == 5 * steps_per_epoch  # epochs 3-4 only, nothing trained twice
    assert resumed["epochs_trained"] == 5
    again, objs = train(cfg)  # a relaunch of a finished run returns its record untouched
    assert objs == {} and again == json.loads(json.dumps(resumed))


def test_evaluate_checkpoint_with_train_false(make_cfg, tmp_path):
    cfg = make_cfg(["dataset=synthetic", *FAST, "trainer.max_epochs=3"], sub="fit")
    fitted, objs = train(cfg)
    best = objs["trainer"].checkpoint_callback.best_model_path
    cfg_eval = make_cfg(["dataset=synthetic", *FAST, "train=false", f"ckpt_path={best}"], sub="eval")
    evaluated, _ = train(cfg_eval)
    assert evaluated["metrics"]["test/acc"] == pytest.approx(fitted["metrics"]["test/acc"])
    assert evaluated["metrics"]["test/loss"] == pytest.approx(fitted["metrics"]["test/loss"], rel=1e-5)


def test_missing_checkpoint_is_a_config_error(make_cfg):
    cfg = make_cfg(["dataset=synthetic", *FAST, "ckpt_path=/nonexistent/last.ckpt"])
    with pytest.raises(ConfigError, match="ckpt_path=/nonexistent/last.ckpt does not exist"):
        train(cfg)
    with pytest.raises(ConfigError, match="train=false evaluates a checkpoint"):
        train(make_cfg(["dataset=synthetic", *FAST, "train=false"], sub="noeval"))


def test_nan_loss_stops_with_the_step_and_leaves_no_record(make_cfg):
    cfg = make_cfg(["dataset=synthetic", *FAST, "dataset.noise=nan"])
    with pytest.raises(TrainingError, match=r"became nan at epoch 0, global step 0 \(batch 0\)"):
        train(cfg)
    assert not os.path.exists(os.path.join(cfg.paths.output_dir, "metrics.json"))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_cli_missing_dataset_is_one_clear_message(tmp_path):
    r = run_cli("dataset=brca", f"paths.data_dir={tmp_path}", "logger=none", f"hydra.run.dir={tmp_path}/run")
    assert r.returncode == 1
    assert (
        "fusionbench: Dataset 'brca' is incomplete" in r.stderr and "prepare_data.py brca --from" in r.stderr
    )
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_cli_nan_loss_exits_nonzero_with_message(tmp_path):
    r = run_cli("dataset=synthetic", "dataset.noise=nan", "logger=none", f"hydra.run.dir={tmp_path}/run")
    assert r.returncode == 1 and "global step 0" in r.stderr and "Traceback" not in r.stderr


def test_ddp_sim_trains_on_two_processes(make_cfg):
    cfg = make_cfg(["dataset=synthetic", "trainer=ddp_sim", *FAST, "trainer.max_epochs=2"])
    result, objs = train(cfg)
    assert objs["trainer"].world_size == 2
    # each process sees half of the 256 training samples: 4 batches of 32 per epoch
    assert result["global_steps"] == 2 * 4
    assert set(result["metrics"]) >= {"test/acc", "test/loss"}
    with open(os.path.join(cfg.paths.output_dir, "metrics.json")) as f:
        assert json.load(f)["status"] == "complete"
    # the spawned processes' best checkpoint reaches the record (and a sweep's objective) through last.ckpt
    best = result["best_val"]
    assert (
        best["metric"] == cfg.dataset.monitor.metric
        and math.isfinite(best["value"])
        and best["epoch"] in (0, 1)
    )
    # so do the training curves, which this process's EpochLog never saw
    assert [e["epoch"] for e in result["history"]] == [0, 1]
    assert all({"train/loss", "val/loss"} <= set(e) and "resumed" not in e for e in result["history"])
    assert result["history"][best["epoch"]][best["metric"]] == pytest.approx(best["value"])
    assert [e["epoch"] for e in result["deq_solver"]["epochs"]] == [0, 1]  # DEQMonitor's, the same way
    # the test ran in the spawned processes too: its solver shares come from the logged metrics
    test_forward = result["deq_solver"]["test_forward"]
    assert test_forward["converged"] == pytest.approx(result["metrics"]["test/deq/f_converged"], abs=1e-6)
    assert 0 <= test_forward["converged"] <= 1 and test_forward["rel_residual"] >= 0


def test_ddp_sim_trains_profusion_around_mfas(make_cfg):
    """Pro-Fusion's unrolled graph and MFAS's intermediate-layer fusion under DDP: every parameter must
    get a gradient on every rank (DDP refuses unused parameters)."""
    shapes = "dataset.shapes={audio: [1, 112, 112], image: [1, 28, 28]}"
    cfg = make_cfg(
        [
            "dataset=synthetic",
            shapes,
            "dataset.modalities=[audio,image]",
            "backbone=avmnist",
            "fusion=profusion",
            "fusion.base=mfas",
            "fusion.unroll_steps=2",
            "trainer=ddp_sim",
            *FAST,
            "trainer.max_epochs=1",
            "+trainer.limit_train_batches=2",
            "+trainer.limit_val_batches=1",
            "+trainer.limit_test_batches=1",
        ]
    )
    result, objs = train(cfg)
    assert objs["trainer"].world_size == 2 and result["global_steps"] == 2
    assert math.isfinite(result["metrics"]["test/loss"])


def test_multirun_seed_sweep_into_deterministic_folders(tmp_path):
    r = run_cli(
        "-m",
        "experiment=baselines_rosmap_mirna",
        "sweep=seeds",
        "seed=0,1",
        "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false",
        "logger=none",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    seeds = sorted(
        json.loads(p.read_text())["seed"] for p in tmp_path.glob("baselines_rosmap_mirna/seed=*/metrics.json")
    )
    assert seeds == [0, 1]
    # a table row (configs/tables/baselines_rosmap.yaml): its recipe with the row's overrides, under its name
    ran = OmegaConf.load(tmp_path / "baselines_rosmap_mirna/seed=0/.hydra/config.yaml")
    assert ran.experiment_name == "baselines_rosmap_mirna" and list(ran.dataset.modalities) == ["mirna"]
    assert ran.fusion._target_.endswith("UnimodalModel") and ran.trainer.max_epochs == 2


def test_deq_run_writes_convergence_diagnostics(make_cfg):
    cfg = make_cfg(["dataset=synthetic", "fusion=deq", *FAST, "callbacks.deq_diagnostics.steps=7"])
    train(cfg)
    with open(os.path.join(cfg.paths.output_dir, "diagnostics.json")) as f:
        diag = json.load(f)
    assert diag["steps"] == 7 and diag["mode"] == "deq" and diag["batch_size"] == 32
    assert len(diag["iteration_rel_diff"]) == 7 and len(diag["solver_rel_residual"]) == 7
    shares = diag["gate_share"]
    assert sorted(shares) == ["audio", "image", "text"]
    for step in range(7):  # normalised over modalities at every step
        assert sum(shares[m][step] for m in shares) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def brca_fixture_dir(tmp_path_factory):
    """A dataset with BRCA's exact shapes in MOGONET layout (the real files are not obtainable here)."""
    from conftest import write_mogonet_fixture

    root = tmp_path_factory.mktemp("data")
    write_mogonet_fixture(root / "brca", n_tr=612, n_te=263, dims=(1000, 1000, 503), num_classes=5)
    return root


@pytest.fixture(scope="module")
def avmnist_fixture_dir(tmp_path_factory):
    """AV-MNIST in the MultiBench npy layout at its real per-sample shapes, 80 + 20 rows."""
    from fusionbench.data import AVMNISTDataModule

    root = tmp_path_factory.mktemp("data")
    AVMNISTDataModule.write(root / "avmnist", n_train=80, n_test=20)
    return root


@pytest.fixture(scope="module")
def mmimdb_fixture_dir(tmp_path_factory):
    """MM-IMDB in gmu-mmimdb's HDF5 layout (MultiBench's file), 24 / 8 / 8 rows."""
    from fusionbench.data.mmimdb import write_fixture

    root = tmp_path_factory.mktemp("data")
    write_fixture(root / "mmimdb")
    return root


@pytest.fixture(scope="module")
def sentiment_fixture_dir(tmp_path_factory):
    """Every sentiment dataset in its real layout (24 / 8 / 8 segments): MultiBench's affect pickles
    (mosei/, mosi/), CM-BERT's tsv + audio pickle (mosi_cmbert/), MAG's word-aligned pickles (mosi_mag/,
    mosei_mag/), and pretrained/ holding tiny saved BERT and XLNet models under the names the backbones
    expect."""
    from fusionbench.data import mag, mosei, mosi_cmbert
    from fusionbench.data.text import FIXTURE_WORDS
    from fusionbench.encoders.pretrained import save_tiny_pretrained

    root = tmp_path_factory.mktemp("data")
    mosei.write_fixture(root / "mosei")
    mosei.write_fixture(root / "mosi", file="mosi_raw.pkl", seed=1)
    mosi_cmbert.write_fixture(root / "mosi_cmbert")
    mag.write_fixture(root / "mosi_mag", file="mosi.pkl", feature_dims={"audio": 74, "vision": 47})
    mag.write_fixture(root / "mosei_mag", file="mosei.pkl", feature_dims={"audio": 74, "vision": 35})
    save_tiny_pretrained(root / "pretrained" / "bert-base-uncased", "bert", FIXTURE_WORDS)
    save_tiny_pretrained(root / "pretrained" / "xlnet-base-cased", "xlnet", FIXTURE_WORDS)
    return root


SENTIMENT = ("mosei", "mosi", "mosi_cmbert", "mosi_words", "mosi_mag", "mosei_mag")


@pytest.fixture(scope="module")
def media_fixture_dir(tmp_path_factory):
    """Raw MM-IMDB (split.json, per-movie json + jpeg poster: 6 / 2 / 2 movies) and VQA-v2 (official
    question and annotation files, MCAN's per-image npz features, MCAN's answer dictionary when the shared
    copy is here), plus a tiny saved BERT as bert-base-uncased."""
    from fusionbench.data import mmimdb_raw, vqa
    from fusionbench.data.text import FIXTURE_WORDS
    from fusionbench.encoders.pretrained import save_tiny_pretrained

    root = tmp_path_factory.mktemp("data")
    mmimdb_raw.write_fixture(root / "mmimdb_raw", {"train": 6, "val": 2, "test": 2})
    answers = ROOT.parent / "shared" / "data" / "vqa_v2" / "mcan_answer_dict.json"
    vqa.write_fixture(
        root / "vqa_v2", n_images=4, n_questions=8, answer_dict=answers if answers.is_file() else None
    )
    save_tiny_pretrained(root / "pretrained" / "bert-base-uncased", "bert", FIXTURE_WORDS)
    return root


# one-batch sizes of the VQA models (the paper sizes have 30-200 M parameters)
TINY_VQA = {
    "mcan": "hidden=16 heads=2 ff=32 layers=1 flat_mlp=8 flat_glimpses=1 flat_out=16",
    "mutan": "embed_dim=6 question_dim=8 att_dim_hv=5 att_dim_hq=5 att_dim_mm=7 att_rank=2 dim_hv=8 dim_hq=4 "
    "dim_mm=6 rank=3",
}


def smoke_experiments() -> list[str]:
    """One experiment per distinct code path: every recipe file and every table row, except that the rows of a
    recipe that choose the same configs and switches (strings and booleans) and differ only in numbers, lists
    or mappings (a λ sweep, the views of a DEQ row, the points of a curve) share one smoke run.
    test_experiments.py composes every one of them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from fusionbench.experiments import rows

    parser = OverridesParser.create()
    chosen: dict[tuple, str] = {
        (p.stem, ()): p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml")
    }
    for name, row in sorted(rows().items()):
        choices = [
            o for o in parser.parse_overrides(list(row.overrides)) if isinstance(o.value(), str | bool)
        ]
        chosen.setdefault((row.recipe, tuple(sorted(f"{o.key_or_group}={o.value()}" for o in choices))), name)
    return sorted(chosen.values())


EXPERIMENTS = smoke_experiments()


FIXTURE_SIZES = "dataset.num_samples={train: 24, val: 8, test: 8}"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_smoke_runs(
    experiment,
    make_cfg,
    brca_fixture_dir,
    avmnist_fixture_dir,
    mmimdb_fixture_dir,
    sentiment_fixture_dir,
    media_fixture_dir,
    tmp_path_factory,
):
    """One batch of train/val/test of each experiment of `smoke_experiments` (BRCA, AV-MNIST, MM-IMDB and the
    sentiment ones on fixtures in the real formats and shapes, with tiny saved BERT / XLNet models; DynMM rows
    that load their stage I from earlier runs start from fresh experts)."""
    dataset = compose_cfg(
        [f"experiment={experiment}"], return_hydra_config=True
    ).hydra.runtime.choices.dataset
    extra = []
    if dataset == "brca":
        extra = [
            f"paths.data_dir={brca_fixture_dir}",
            "dataset.verify_checksums=false",
            "dataset.batch_size=32",
        ]
    if dataset == "avmnist":
        extra = [
            f"paths.data_dir={avmnist_fixture_dir}",
            "dataset.num_train=60",
            "dataset.num_samples={train: 80, test: 20}",
        ]
    if dataset.startswith(
        "stocks"
    ):  # the real snapshot, short windows and a 2-point noise grid (a 500-step transformer is slow)
        extra = [
            "dataset.window=8",
            "dataset.num_train=64",
            "dataset.num_val=16",
            "robustness.levels=[0.0,0.5]",
            # 2010 only: ~80 test windows instead of the ~6,000 short windows the whole snapshot gives
            "dataset.start_date=2010-01-04",
            "dataset.end_date=2010-08-31",
        ]
    if dataset == "mmimdb":
        extra = [f"paths.data_dir={mmimdb_fixture_dir}", FIXTURE_SIZES]
    if dataset == "mmimdb_raw":  # ResNet-18 at random instead of the saved VGG-16 / ResNet-152 weights
        extra = [
            f"paths.data_dir={media_fixture_dir}",
            f"paths.pretrained_dir={media_fixture_dir / 'pretrained'}",
            "dataset.num_samples={train: 6, val: 2, test: 2}",
            "dataset.max_len=32",
            "dataset.image_size=32",
            "dataset.resize=36",
            "dataset.num_workers=0",
            "dataset.batch_size=2",
            "trainer.accumulate_grad_batches=1",
            "backbone.image.arch=resnet18",
            "backbone.image.random_init=true",
            "backbone.image.weights=null",
            "backbone.image.proj_dim=32",  # the tiny BERT's width, which DEQ fusion needs on both sides
        ]
    if dataset == "vqa":
        model = compose_cfg([f"experiment={experiment}"]).fusion._target_.split(".")[-1]
        sizes = TINY_VQA["mcan" if model == "MCANFusion" else "mutan"].split()
        extra = [
            f"paths.data_dir={media_fixture_dir}",
            "dataset.num_samples=null",
            "dataset.verify_checksums=false",
            "dataset.val_from_train=0.0",
            "dataset.batch_size=4",
            "dataset.num_workers=0",
            *[f"fusion.{kv}" for kv in sizes],
        ]
    if dataset == "rgbd_synthetic":
        extra = [FIXTURE_SIZES]
    if dataset == "nyuv2":  # the prepared layout from a tiny official .mat; ResNet-50 trunks at random
        extra = [
            f"dataset.data_dir={nyuv2_fixture_dir(tmp_path_factory.mktemp('nyu'), height=96, width=96)}",
            "dataset.height=96",
            "dataset.width=96",
            "dataset.num_samples=null",
            "dataset.num_workers=0",
            "dataset.batch_size=2",
            "backbone.rgb.weights=null",
            "backbone.depth.weights=null",
        ]
    if dataset in SENTIMENT:
        extra = [
            f"paths.data_dir={sentiment_fixture_dir}",
            f"paths.pretrained_dir={sentiment_fixture_dir / 'pretrained'}",
            FIXTURE_SIZES,
            "dataset.verify_checksums=false",
        ]
    cfg = make_cfg(
        [
            f"experiment={experiment}",
            "debug=fdr",
            "trainer.enable_progress_bar=false",
            "trainer.detect_anomaly=false",
            *extra,
        ]
    )
    if cfg.fusion.get(
        "stage1_ckpt"
    ):  # covered end to end by test_dynmm_row_starts_from_the_expert_rows_checkpoints
        cfg.fusion.stage1_ckpt = None
    result, objs = train(cfg)
    assert objs["trainer"].global_step == 1
    if objs["datamodule"].task_type == "multilabel":
        assert 0.0 <= result["metrics"]["test/f1_macro"] <= 1.0
        return
    if cfg.get("robustness"):
        curve = result["robustness"]["curves"]["all"]["metrics"]
        assert len(curve["mse"]) == len(cfg.robustness.levels) and all(math.isfinite(v) for v in curve["mse"])
    if objs["datamodule"].task_type == "segmentation":
        assert 0.0 <= result["metrics"]["test/miou"] <= 1.0 and result["metrics"]["test/cost/gmacs"] > 0
    elif objs["datamodule"].task_type == "regression":
        assert math.isfinite(result["metrics"]["test/mse"])
    elif objs["datamodule"].task_type == "vqa":
        assert 0.0 <= result["metrics"]["test/vqa_acc"] <= 1.0
    else:
        assert 0.0 <= result["metrics"]["test/acc"] <= 1.0


def test_dynmm_row_starts_from_the_expert_rows_checkpoints(make_cfg, mmimdb_fixture_dir, tmp_path):
    """DynMM Table 1 as a user runs it: the two expert rows, then DynMM-b, whose stage I is those runs'
    selected checkpoints (found by pattern under results/runs); its experts start with exactly the static
    experts' weights."""
    import torch

    from fusionbench.fusion import DynMMFusion

    results = tmp_path / "results"
    common = [
        f"paths.data_dir={mmimdb_fixture_dir}",
        FIXTURE_SIZES,
        f"paths.results_dir={results}",
        "seed=3",
        "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false",
        "logger=none",
    ]
    experts = {}
    for row in ("text", "late"):
        sub = f"results/runs/dynmm_t1_mmimdb_{row}/seed=3"
        _, objs = train(make_cfg([f"experiment=dynmm_t1_mmimdb_{row}", *common], sub=sub))
        ckpts = list((tmp_path / sub / "checkpoints").glob("epoch*.ckpt"))
        assert len(ckpts) == 1
        experts[row] = torch.load(ckpts[0], map_location="cpu", weights_only=False)["state_dict"]
    cfg = make_cfg(["experiment=dynmm_t1_mmimdb_b", *common, "trainer.max_epochs=1"], sub="dyn")
    assert cfg.fusion.stage1_ckpt.uni == f"{results}/runs/dynmm_t1_mmimdb_text/seed=3/checkpoints/epoch*.ckpt"
    from fusionbench.train import build

    model = next(m for m in build(cfg)[1].modules() if isinstance(m, DynMMFusion))
    assert model.stage1_loaded and model.stage_at(0) == 2
    for name, row in (("uni", "text"), ("late", "late")):
        loaded = model.experts[name].state_dict()
        static = {k.removeprefix("model."): v for k, v in experts[row].items() if k.startswith("model.")}
        assert loaded.keys() == static.keys()
        assert all(torch.equal(loaded[k], static[k]) for k in loaded)
    result, _ = train(cfg)
    assert result["metrics"]["test/dynmm/share_uni"] + result["metrics"][
        "test/dynmm/share_late"
    ] == pytest.approx(1.0)


def test_last_checkpoint_is_the_latest_epoch_and_a_resumed_run_matches_an_uninterrupted_one(
    make_cfg, monkeypatch
):
    import torch

    common = ["dataset=synthetic", "fusion=deq", "seed=5", *FAST, "trainer.max_epochs=4", "logger=csv"]
    common += ["callbacks.early_stopping.patience=100"]
    whole, _ = train(make_cfg(common, sub="whole"))
    cfg = make_cfg(common, sub="split")
    interrupted(cfg, monkeypatch, epoch=1)
    last = os.path.join(cfg.paths.output_dir, "checkpoints", "last.ckpt")
    state = torch.load(last, map_location="cpu", weights_only=True)  # RNG states stored as plain tensors
    assert state["epoch"] == 1 and "fusionbench_rng" in state  # the latest epoch, whatever the best one was
    resumed, _ = train(cfg)
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 3
    assert resumed["metrics"] == whole["metrics"]  # nothing lost, nothing counted twice
    assert resumed["best_val"] == whole["best_val"] and resumed["global_steps"] == whole["global_steps"]
    history = (Path(cfg.paths.output_dir) / "csv" / "metrics.csv").read_text().splitlines()
    epochs = {line.split(",")[history[0].split(",").index("epoch")] for line in history[1:]}
    assert {"0", "1", "2", "3"} <= epochs  # the CSV history of both attempts, appended
    # the record's curves: every epoch once, as uninterrupted (the checkpoints carry them; Lightning writes
    # them when the epoch ends, after EpochLog has its training means)
    assert [e["epoch"] for e in resumed["history"]] == [0, 1, 2, 3] and resumed["history"] == whole["history"]


def test_deq_run_records_solver_convergence_per_epoch(make_cfg, caplog):
    import logging

    cfg = make_cfg(
        [
            "dataset=synthetic",
            "fusion=deq",
            *FAST,
            "trainer.max_epochs=3",
            "fusion.eval_f_max_iter=2",
            "fusion.failure_tol=1e-9",
            "fusion.max_failures=1000000",
        ]
    )
    with caplog.at_level(logging.WARNING, logger="fusionbench"):
        record, _ = train(cfg)
    solver = record["deq_solver"]
    assert [e["epoch"] for e in solver["epochs"]] == [0, 1, 2]
    assert all(e["train_f_converged"] == 0.0 and 0 <= e["train_b_converged"] <= 1 for e in solver["epochs"])
    assert solver["test_forward"]["converged"] == 0.0 and solver["test_forward"]["solves"] == 64
    assert record["metrics"]["test/deq/f_converged"] == 0.0
    assert (
        "validation samples' forward solves converged" in caplog.text
        and "test samples' forward solves" in caplog.text
    )
    # one training and one validation warning for the three epochs (warn_every=25), not one per batch or epoch
    assert (
        caplog.text.count("of forward solves converged;") == 1
        and caplog.text.count("validation samples") == 1
    )


def test_deq_monitor_record_takes_test_shares_from_logged_metrics_when_it_counted_none():
    from fusionbench.fusion.deq.callbacks import DEQMonitor

    monitor = DEQMonitor()
    monitor.history = [{"epoch": 0, "train_f_converged": 1.0}]
    logged = {"test/deq/f_converged": 0.75, "test/deq/f_rel_residual": 0.0123456789, "test/acc": 0.5}
    assert monitor.record(test_metrics=logged)["deq_solver"] == {
        "test_forward": {"converged": 0.75, "rel_residual": 0.012346},
        "epochs": [{"epoch": 0, "train_f_converged": 1.0}],
    }
    monitor.test = {"solves": 64, "converged": 1.0, "rel_residual": 1e-5}  # its own count wins
    assert monitor.record(test_metrics=logged)["deq_solver"]["test_forward"] == monitor.test
    assert DEQMonitor().record(test_metrics={"test/acc": 0.5}) == {}  # no DEQ fusion in the model


def test_deq_record_entry_is_absent_for_other_fusions(make_cfg):
    record, _ = train(make_cfg(["dataset=synthetic", "fusion=concat", *FAST]))
    assert "deq_solver" not in record
