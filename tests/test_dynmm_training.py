"""DynMM's two-stage training through Lightning and Hydra: what each stage trains, stage-I checkpoints,
evaluation of a trained checkpoint, routing time in the record, early stopping around the stage switch."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from conftest import FAST, compose_cfg
from dynmm_common import CALLBACK, batch, bias_gate, model
from hydra.errors import InstantiationException
from pytorch_lightning.callbacks import EarlyStopping

from fusionbench.errors import ConfigError
from fusionbench.fusion import DynMMFusion
from fusionbench.fusion.dynmm.callback import DynMMCallback, stage2_name
from fusionbench.task import task_loss
from fusionbench.train import build, train


# -- two-stage training -----------------------------------------------------------------------------------
class Snapshots(pl.Callback):
    """Weights of the experts and the gate at every epoch start and at the end; val/stage2_loss per epoch."""

    def __init__(self) -> None:
        self.weights: list[dict[str, dict[str, torch.Tensor]]] = []
        self.stage2_loss: list[float] = []

    def grab(self, pl_module) -> None:
        m = pl_module.model
        self.weights.append(
            {
                part: {k: v.detach().clone() for k, v in getattr(m, part).named_parameters()}
                for part in ("experts", "gate")
            }
        )

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.grab(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.grab(pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.stage2_loss.append(float(trainer.callback_metrics["val/stage2_loss"]))


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before)


def fit(overrides: list[str], epochs: int) -> tuple[Snapshots, pl.Trainer, object]:
    cfg = compose_cfg(["dataset=synthetic", "fusion=dynmm", *overrides])
    pl.seed_everything(0)
    dm, task = build(cfg)
    snaps = Snapshots()
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[DynMMCallback(), snaps],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )
    trainer.fit(task, datamodule=dm)
    return snaps, trainer, task


def test_stage_one_trains_experts_only_and_stage_two_with_frozen_experts_trains_the_gate_only():
    snaps, trainer, task = fit(
        ["fusion.stage1_epochs=1", "fusion.freeze_experts=true", "fusion.gating=softmax"], epochs=2
    )
    start, switch, end = snaps.weights
    assert changed(start["experts"], switch["experts"]) and not changed(
        start["gate"], switch["gate"]
    )  # stage I
    assert not changed(switch["experts"], end["experts"]) and changed(switch["gate"], end["gate"])  # stage II
    assert snaps.stage2_loss[0] == math.inf and math.isfinite(snaps.stage2_loss[1])
    model = task.model
    assert int(model.stage) == 2 and all(not p.requires_grad for p in model.experts.parameters())
    assert not model.experts.training  # frozen experts keep their running statistics
    shares = [trainer.callback_metrics[f"train/dynmm/share_{n}"].item() for n in model.expert_names]
    assert sum(shares) == pytest.approx(1.0)


def test_stage_two_fine_tunes_experts_unless_frozen():
    snaps, _, _ = fit(
        ["fusion.stage1_epochs=1", "fusion.freeze_experts=false", "fusion.gating=gumbel"], epochs=2
    )
    _, switch, end = snaps.weights
    assert changed(switch["experts"], end["experts"]) and changed(switch["gate"], end["gate"])


def test_stage1_checkpoint_skips_stage_one_with_identical_experts(tmp_path):
    first = compose_cfg(
        [
            "dataset=synthetic",
            "fusion=dynmm",
            *FAST,
            "trainer.max_epochs=1",
            "fusion.stage1_epochs=1",
            CALLBACK,
        ],
        tmp_path / "stage1",
    )
    _, objs = train(first)
    ckpt = tmp_path / "stage1" / "checkpoints" / "last.ckpt"
    trained = {k: v.clone() for k, v in objs["task"].model.experts.state_dict().items()}
    second = ["fusion.stage1_epochs=5", f"fusion.stage1_ckpt={ckpt}", "fusion.freeze_experts=true"]
    cfg = compose_cfg(["dataset=synthetic", "fusion=dynmm", *second])
    _, task = build(cfg)
    loaded = task.model.experts.state_dict()
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in trained)
    assert int(task.model.stage) == 2 and task.model.stage_at(0) == 2
    snaps, _, task = fit(second, epochs=1)
    assert math.isfinite(snaps.stage2_loss[0])  # epoch 0 is already stage II
    assert not changed(snaps.weights[0]["experts"], snaps.weights[-1]["experts"])
    assert all(torch.equal(task.model.experts.state_dict()[k], trained[k]) for k in trained)
    # a mapping {expert: checkpoint} loads each expert from a checkpoint too
    by_expert = DynMMFusion(
        build(cfg)[1].model.experts["late"].encoders,
        3,
        experts={
            "uni": {"fusion": "unimodal", "modalities": [0]},
            "late": {"fusion": "concat", "modalities": "all"},
        },
        stage1_ckpt={"uni": str(ckpt), "late": str(ckpt)},
    )
    assert all(torch.equal(by_expert.experts.state_dict()[k], trained[k]) for k in trained)


def test_a_trained_checkpoint_evaluates_in_stage_two_with_train_false(tmp_path):
    common = [
        "dataset=synthetic",
        "fusion=dynmm",
        *FAST,
        "fusion.stage1_epochs=1",
        "fusion.gating=softmax",
        "callbacks.dynmm.timing={samples: 40, batch_sizes: [1, 8], repeats: 1}",
    ]
    fit_cfg = compose_cfg(
        [
            *common,
            "trainer.max_epochs=2",
            CALLBACK,
            "callbacks.model_checkpoint.monitor=val/stage2_loss",
            "callbacks.model_checkpoint.mode=min",
        ],
        tmp_path / "fit",
    )
    fitted, objs = train(fit_cfg)
    assert (
        fitted["best_val"]["metric"] == "val/stage2_loss" and fitted["best_val"]["epoch"] == 1
    )  # stage II only
    best = objs["trainer"].checkpoint_callback.best_model_path
    evaluated, _ = train(compose_cfg([*common, "train=false", f"ckpt_path={best}"], tmp_path / "eval"))
    assert evaluated["metrics"]["test/dynmm/stage"] == 2.0  # stage and temperature travel with the checkpoint
    assert evaluated["metrics"]["test/acc"] == pytest.approx(fitted["metrics"]["test/acc"])
    assert evaluated["metrics"]["test/loss"] == pytest.approx(fitted["metrics"]["test/loss"], rel=1e-5)
    assert evaluated["compute"]["madds"] > 0 and set(evaluated["compute"]["by_module"]) >= {
        "gate",
        "experts.uni",
        "experts.late",
    }
    # the record times the tested model: routed vs every expert, on the first 40 test samples at batch 1 and 8
    timing = evaluated["dynmm_timing"]
    assert timing["samples"] == 40 and set(timing["ms_per_sample"]) == {"1", "8"}
    assert set(timing["ms_per_sample"]["1"]) == {
        "routed",
        "every_expert",
        "gate",
        "expert_uni",
        "expert_late",
        "speedup",
    }
    assert all(v > 0 for v in timing["ms_per_sample"]["8"].values())
    assert timing["max_abs_diff"] < 1e-5 and sum(timing["shares"].values()) == pytest.approx(1.0)
    assert fitted["dynmm_timing"]["shares"] == timing["shares"]  # same weights, same test samples
    off, _ = train(
        compose_cfg(
            [*common, "train=false", f"ckpt_path={best}", "callbacks.dynmm.timing.samples=0"],
            tmp_path / "off",
        )
    )
    assert "dynmm_timing" not in off


def test_time_routing_times_each_path_and_checks_routed_outputs():
    """The routed pass equals the selected expert per sample; the shares are the gate's argmax shares."""
    from fusionbench.fusion.dynmm.timing import time_routing

    m = model().eval()
    bias_gate(m)
    x = batch(24)
    with torch.no_grad():
        choice = m.gate(x).argmax(-1)
    out = time_routing(m, x, batch_sizes=[1, 24], repeats=1)
    assert out["shares"]["uni"] == pytest.approx((choice == 0).float().mean().item())
    assert 0 < out["shares"]["uni"] < 1 and out["max_abs_diff"] < 1e-6
    ms = out["ms_per_sample"]["24"]
    assert ms["speedup"] == pytest.approx(ms["every_expert"] / ms["routed"])
    assert not m.training
    soft = model(gating="soft").eval()
    bias_gate(soft)
    with torch.no_grad():
        weights = torch.softmax(soft.gate(x), dim=-1).mean(0)
    out = time_routing(
        soft, x, batch_sizes=[24], repeats=1
    )  # the mixture, against the experts run separately
    assert out["max_abs_diff"] < 1e-5 and out["shares"]["late"] == pytest.approx(weights[1].item(), rel=1e-5)


def test_stage_one_loss_is_the_sum_of_the_experts_task_losses():
    m = model(stage1_epochs=2)
    m.bind_task_loss(lambda logits, target: task_loss("multiclass", logits, target))
    x, y = batch(8), torch.arange(8) % 3
    out = m.train()(x)
    assert int(m.stage) == 1 and not out.logits.requires_grad  # the uniform mixture only reports a loss
    per_expert = [
        F.cross_entropy(m.experts[n]({k: x[k] for k in m.expert_modalities[n]}).logits, y)
        for n in m.expert_names
    ]
    assert m.target_loss(out, y).item() == pytest.approx(sum(v.item() for v in per_expert), rel=1e-6)
    assert out.aux_loss is None  # no resource loss before the gate is trained
    m.set_epoch(2)
    out = m(x)
    assert int(m.stage) == 2 and m.target_loss(out, y).item() == 0.0 and out.aux_loss is not None


class EarlyStoppingProbe(pl.Callback):
    def __init__(self, es: EarlyStopping) -> None:
        self.es, self.seen = es, []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.seen.append(
            (trainer.current_epoch, int(pl_module.model.stage), float(self.es.best_score), self.es.wait_count)
        )


def test_early_stopping_waits_for_stage_two_and_restarts_there():
    cfg = compose_cfg(["dataset=synthetic", "fusion=dynmm", "fusion.stage1_epochs=3"])
    pl.seed_everything(0)
    dm, task = build(cfg)
    es = EarlyStopping(
        monitor="val/loss", patience=1, min_delta=100.0
    )  # only the first value after a reset improves
    probe = EarlyStoppingProbe(es)
    trainer = pl.Trainer(
        max_epochs=5,
        callbacks=[DynMMCallback(), es, probe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )
    trainer.fit(task, datamodule=dm)
    # stage I (epochs 0-2) never stops; stage II starts with a fresh best score and patience
    assert [(e, s) for e, s, _, _ in probe.seen[:4]] == [(0, 1), (1, 1), (2, 1), (3, 2)]
    assert all(best == math.inf and wait == 0 for _, _, best, wait in probe.seen[:4])
    bad = EarlyStopping(monitor="val/stage2_loss")
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[DynMMCallback(), bad],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    with pytest.raises(ConfigError, match="check_finite=false"):
        trainer.fit(task, datamodule=dm)


def test_callback_names_and_is_a_no_op_for_other_fusions():
    assert (
        stage2_name("val/loss") == "val/stage2_loss" and stage2_name("val/f1_macro") == "val/stage2_f1_macro"
    )
    cfg = compose_cfg(["dataset=synthetic", "fusion=concat"])
    _, task = build(cfg)
    assert DynMMCallback.dynmm_model(task) is None
    with pytest.raises(ConfigError, match="must be one of"):
        DynMMCallback(metrics={"val/loss": "lowest"})


def test_config_nodes_with_targets_reach_dynmm_unbuilt(tmp_path):
    """Through Hydra (configs/fusion/dynmm.yaml has _recursive_: false): an expert or gate given as a node
    with _target_ is built by DynMM with the expert's encoders and the gate's width check, not by Hydra
    beforehand."""
    base = ["experiment=dynmm_rosmap", "dataset.batch_size=16"]
    node = "fusion.experts.uni.fusion={_target_: fusionbench.fusion.ConcatFusion, head_hidden: [8]}"
    gate = "fusion.gate={_target_: fusionbench.fusion.dynmm.MLPGate, num_outputs: 3, hidden: [16]}"
    _, task = build(compose_cfg([*base, node, gate], tmp_path / "a"))
    model = task.model
    assert type(model.experts["uni"]).__name__ == "ConcatFusion" and list(model.experts["uni"].encoders) == [
        "mrna"
    ]
    assert model.experts["uni"].head[0].out_features == 8 and model.gate.net[0].out_features == 16
    with pytest.raises(
        InstantiationException,
        match=r"gate outputs 2 logits but there are 3 experts \['uni', 'late', 'deq'\]",
    ):
        build(compose_cfg([*base, gate.replace("num_outputs: 3", "num_outputs: 2")], tmp_path / "b"))
