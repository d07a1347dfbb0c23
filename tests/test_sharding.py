"""Sharding under DDP (issue 16, item 5): training shards by sample (for VQA: by question) through Lightning's
distributed sampler; evaluation shards without padding, so every question is scored exactly once, checked with
the CPU DDP simulation (`trainer=ddp_sim`, two processes) against a single-process evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from torch.utils.data import TensorDataset

from fusionbench import ROOT
from fusionbench.data.base import UnpaddedDistributedSampler
from fusionbench.train import train

TINY_MCAN = ["hidden=16", "heads=2", "ff=32", "layers=1", "flat_mlp=8", "flat_glimpses=1", "flat_out=16"]


def tiny_vqa(data_dir: Path) -> list[str]:
    """A tiny MCAN on the VQA fixture under ``data_dir``, batches of 2."""
    return [
        "dataset=vqa",
        "fusion=mcan",
        f"paths.data_dir={data_dir}",
        "dataset.num_samples=null",
        "dataset.verify_checksums=false",
        "dataset.batch_size=2",
        "dataset.num_workers=0",
        *[f"fusion.{kv}" for kv in TINY_MCAN],
    ]


@pytest.mark.parametrize("n, world", [(7, 2), (7, 3), (9, 3), (2, 4)])
def test_evaluation_shards_cover_every_sample_once(n: int, world: int) -> None:
    import torch

    data = TensorDataset(torch.arange(n))
    shards = [list(UnpaddedDistributedSampler(data, world, rank)) for rank in range(world)]
    assert sorted(sum(shards, [])) == list(range(n))  # every sample, none twice
    assert [len(s) for s in shards] == [len(UnpaddedDistributedSampler(data, world, r)) for r in range(world)]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory) -> Path:
    from fusionbench.data.vqa import write_fixture

    root = tmp_path_factory.mktemp("data")
    answers = ROOT.parent / "shared" / "data" / "vqa_v2" / "mcan_answer_dict.json"
    # 7 questions per split: an odd count, which Lightning's own sampler would pad with a repeated question
    write_fixture(
        root / "vqa_v2", n_images=4, n_questions=7, answer_dict=answers if answers.is_file() else None
    )
    return root


def test_ddp_sim_vqa_scores_each_question_once(make_cfg, vqa_dir: Path) -> None:
    common = [
        *tiny_vqa(vqa_dir),
        "trainer.enable_progress_bar=false",
        "logger=none",
    ]
    cfg = make_cfg([*common, "trainer=ddp_sim", "trainer.max_epochs=1"], sub="ddp")
    result, objs = train(cfg)
    assert objs["trainer"].world_size == 2
    assert result["global_steps"] == math.ceil(math.ceil(7 / 2) / 2)  # 4 questions per rank, batches of 2
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / result["test_checkpoint"]
    single = make_cfg([*common, "trainer=cpu", "train=false", f"ckpt_path={ckpt}"], sub="single")
    evaluation, _ = train(single)
    for key in ("test/vqa_acc", "test/vqa_acc_yesno", "test/vqa_acc_number", "test/vqa_acc_other"):
        ddp, one = result["metrics"].get(key), evaluation["metrics"].get(key)
        assert (
            (ddp is None and one is None)
            or ddp == pytest.approx(one, abs=1e-6)
            or (math.isnan(ddp) and math.isnan(one))
        ), key
    with open(Path(cfg.paths.output_dir) / "metrics.json") as f:
        assert json.load(f)["status"] == "complete"


@pytest.mark.slow  # six spawned processes, about two minutes
def test_a_ddp_sim_vqa_run_killed_mid_training_resumes_to_the_uninterrupted_result(tmp_path, vqa_dir: Path):
    """MCAN on VQA under `trainer=ddp_sim`: a rank killed after epoch 1's checkpoint (as a preempted node),
    the same command relaunched; the record equals the uninterrupted run's (nothing lost or counted twice)."""
    from test_run_folder import kill_and_resume

    args = [
        *tiny_vqa(vqa_dir),
        "seed=1",
        "trainer=ddp_sim",
        "trainer.max_epochs=3",
        "logger=csv",
        "callbacks.early_stopping.patience=100",
        "trainer.enable_progress_bar=false",
    ]
    a, b, killed = kill_and_resume(tmp_path, args)
    assert killed != 0 and a["metrics"] == b["metrics"] and a["best_val"] == b["best_val"]
    assert a["global_steps"] == b["global_steps"] == 3 * 2  # 4 questions per rank, batches of 2, 3 epochs


def test_test_dev_predictions_in_the_official_format(make_cfg, vqa_dir: Path) -> None:
    """`dataset.predict_split=test-dev`: the tested weights answer every test-dev question once, in the
    official submission format, and the record names the file."""
    cfg = make_cfg(
        [
            *tiny_vqa(vqa_dir),
            "dataset.predict_split=test-dev",
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
            "logger=none",
        ]
    )
    result, objs = train(cfg)
    questions = json.loads(
        (vqa_dir / "vqa_v2" / "v2_OpenEnded_mscoco_test-dev2015_questions.json").read_text()
    )
    expected = sorted(q["question_id"] for q in questions["questions"])
    rows = json.loads((Path(cfg.paths.output_dir) / "predictions_test-dev.json").read_text())
    assert [r["question_id"] for r in rows] == expected
    answers = set(objs["datamodule"].answers)
    assert all(isinstance(r["answer"], str) and r["answer"] in answers for r in rows)
    assert result["predictions"] == {"split": "test-dev", "file": "predictions_test-dev.json", "questions": 7}


def test_ddp_sim_segmentation_pools_one_confusion_matrix(make_cfg) -> None:
    """Fusion-level DynMM on RGB-D images under the two-process DDP simulation: the test mIoU comes from one
    confusion matrix summed over the ranks (5 test images: no padding repeats one), equal to a single-process
    evaluation of the same checkpoint."""
    common = [
        "dataset=rgbd_synthetic",
        "fusion=dynmm_esanet",
        "fusion.decoder_channels=[16,16,16]",
        "fusion.decoder_blocks=[1,1,1]",
        "fusion.cost=relative",
        "dataset.num_samples={train: 8, val: 4, test: 5}",
        "dataset.batch_size=2",
        "trainer.enable_progress_bar=false",
        "logger=none",
        "callbacks.dynmm.timing.samples=0",
    ]
    cfg = make_cfg([*common, "trainer=ddp_sim", "trainer.max_epochs=1"], sub="ddp")
    result, objs = train(cfg)
    assert objs["trainer"].world_size == 2
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / result["test_checkpoint"]
    single = make_cfg([*common, "trainer=cpu", "train=false", f"ckpt_path={ckpt}"], sub="single")
    evaluation, _ = train(single)
    # an untrained gate's logits nearly tie, and conv kernels round differently at other batch sizes, so an
    # image may take another branch in the other run: the metrics agree closely, not bit for bit
    for key in ("test/miou", "test/pixel_acc", "test/macc"):
        assert result["metrics"][key] == pytest.approx(evaluation["metrics"][key], rel=0.03), key
    # shares pooled over the 5 test images (multiples of 1/5), not the mean of the ranks' shares (3 and 2)
    shares = [result["metrics"][f"test/dynmm/share_k{k}"] * 5 for k in range(5)]
    assert sum(shares) == pytest.approx(5.0) and all(s == pytest.approx(round(s), abs=1e-5) for s in shares)
