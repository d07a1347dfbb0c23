"""Robustness evaluation: noise functions by their statistics, the seeded corruption, the curves against
hand-computed expected errors, the areas, the table, and the run-record path end to end."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAST, compose_cfg
from torch import nn

from fusionbench.data.base import FusionDataModule, TensorDictDataset
from fusionbench.errors import ConfigError
from fusionbench.fusion.base import FusionOutput
from fusionbench.robustness import (
    Corruption,
    auc,
    batch_limit,
    check_grid,
    evaluate,
    feature_drop,
    relative_auc,
    run_grid,
    scale_unit,
    timestep_drop,
    white_noise,
)
from fusionbench.train import train


def test_white_noise_has_the_level_as_std_and_level_zero_is_identity():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(200_000)
    noisy = white_noise(x, 0.3, g)
    assert abs(noisy.std().item() - 0.3) < 0.005 and abs(noisy.mean().item()) < 0.005
    assert torch.equal(white_noise(x + 1.5, 0.0, g), x + 1.5)


def test_feature_drop_zeroes_the_level_share_of_values():
    x = torch.ones(100_000)
    out = feature_drop(x, 0.25, torch.Generator().manual_seed(1))
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    assert abs((out == 0).float().mean().item() - 0.25) < 0.01


def test_timestep_drop_zeroes_whole_time_steps():
    x = torch.arange(1, 1 + 4000 * 3, dtype=torch.float32).view(4000, 3)  # (time, features), no zero entries
    out = timestep_drop(x, 0.4, torch.Generator().manual_seed(2))
    dropped = (out == 0).all(dim=1)
    assert torch.equal((out == 0).any(dim=1), dropped)  # a step is dropped entirely or kept entirely
    assert torch.equal(out[~dropped], x[~dropped])
    assert abs(dropped.float().mean().item() - 0.4) < 0.03


def test_corruption_is_seeded_per_sample_and_touches_only_its_modalities():
    inputs = {"a": torch.randn(5, 2), "b": torch.randn(5, 2)}
    c = Corruption(["white", "feature_drop"], 0.5, ["a"], seed=7)
    first, again, other = c(inputs, 3), c(inputs, 3), c(inputs, 4)
    assert torch.equal(first["a"], again["a"]) and not torch.equal(first["a"], other["a"])
    assert torch.equal(first["b"], inputs["b"])
    assert not torch.equal(
        Corruption(["white"], 0.5, ["a"], seed=8)(inputs, 3)["a"],
        Corruption(["white"], 0.5, ["a"], seed=7)(inputs, 3)["a"],
    )
    assert Corruption(["white"], 0.0, ["a", "b"])(inputs, 0)["a"] is inputs["a"]  # level 0: the clean sample


def test_gaussian_noise_is_relative_to_the_modality_std():
    x = {"a": torch.zeros(50_000)}
    out = Corruption(["gaussian"], 0.5, ["a"], scales={"a": 4.0})(x, 0)["a"]
    assert abs(out.std().item() - 2.0) < 0.03


def test_timestep_drop_on_flat_features_is_refused():
    with pytest.raises(ConfigError, match="needs sequences"):
        Corruption(["timestep_drop"], 0.2, ["a"])({"a": torch.randn(6)}, 0)


@pytest.mark.parametrize(
    "grid, match",
    [
        ({"levels": [0.0, 0.1], "noise": ["blur"]}, "noise"),
        ({"levels": [], "noise": ["white"]}, "levels"),
        ({"levels": [0.2, 0.1], "noise": ["white"]}, "increasing"),
        ({"levels": [0.0, 1.5], "noise": ["feature_drop"]}, r"\[0, 1\]"),
        ({"levels": [0.0, 0.5], "noise": ["white"], "scopes": ["video"]}, "scopes"),
    ],
)
def test_bad_grids_are_explained(grid, match):
    with pytest.raises(ConfigError, match=match):
        check_grid(grid, ["a", "b"])


def test_areas_by_hand():
    assert auc([0.0, 0.1, 0.3], [1.0, 2.0, 4.0]) == pytest.approx(0.1 * 1.5 + 0.2 * 3.0)
    # an error metric: a model whose MSE is 1 below the baseline's everywhere on [0, 0.8] gains +0.8
    assert relative_auc([0.0, 0.4, 0.8], [1.0, 1.0, 1.0], [2.0, 2.0, 2.0], "mse") == pytest.approx(0.8)
    assert relative_auc([0.0, 0.4, 0.8], [0.9, 0.9, 0.9], [0.5, 0.5, 0.5], "acc") == pytest.approx(0.32)
    assert scale_unit({"x": -1.0, "y": 0.0, "z": 3.0}) == {"x": 0.0, "y": 0.25, "z": 1.0}
    assert scale_unit({"x": 2.0, "y": 2.0}) == {"x": 0.0, "y": 0.0}


# -- curves against expected errors ----------------------------------------------------------------


class LinearSum(nn.Module):
    """y = sum_m w_m . x_m: the exact target of `Frames`, so the clean MSE is 0."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.w = nn.ParameterDict({m: nn.Parameter(w) for m, w in weights.items()})

    def forward(self, inputs):
        y = sum((inputs[m] * self.w[m]).flatten(1).sum(1) for m in sorted(self.w))
        return FusionOutput(y.unsqueeze(1), None, {})


class Frames(FusionDataModule):
    """Standard-normal inputs of the given per-sample shapes, target = LinearSum of them."""

    task_type, num_outputs = "regression", 1

    def __init__(
        self, shapes: dict[str, tuple[int, ...]], weights: dict[str, torch.Tensor], n: int = 4000
    ) -> None:
        super().__init__(name="frames", data_dir=".")
        g = torch.Generator().manual_seed(0)
        x = {m: torch.randn(n, *s, generator=g) for m, s in shapes.items()}
        y = LinearSum(weights)(x).logits.detach()
        self.modalities = sorted(shapes)
        self.test_set = TensorDictDataset(x, y)


class Task:
    def __init__(self, model: nn.Module) -> None:
        self.model, self.task_type = model, "regression"


def test_curves_match_the_expected_errors_of_a_linear_model():
    w = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5, -1.0, 3.0])}
    dm, task = Frames({"a": (2,), "b": (3,)}, w), Task(LinearSum(w))
    rob = run_grid(task, dm, {"levels": [0.0, 0.2, 0.5], "noise": ["white"], "scopes": ["all", "each"]})
    sq = {m: float((v**2).sum()) for m, v in w.items()}
    for scope, norm in (("all", sq["a"] + sq["b"]), ("a", sq["a"]), ("b", sq["b"])):
        mse = rob["curves"][scope]["metrics"]["mse"]
        assert mse[0] == pytest.approx(0.0, abs=1e-10)
        for p, got in zip([0.2, 0.5], mse[1:]):
            assert got == pytest.approx(p * p * norm, rel=0.06)  # E[(w . eps)^2] = p^2 |w|^2
        assert rob["curves"][scope]["auc"]["mse"] == pytest.approx(auc([0.0, 0.2, 0.5], mse))
    assert rob["curves"]["a"]["modalities"] == ["a"] and rob["curves"]["all"]["modalities"] == ["a", "b"]
    # same grid seed: the same corrupted inputs, whatever the batch size
    again = run_grid(
        task, dm, {"levels": [0.0, 0.2, 0.5], "noise": ["white"], "scopes": ["all", "each"], "batch_size": 7}
    )
    assert again["curves"]["all"]["metrics"]["mse"] == pytest.approx(
        rob["curves"]["all"]["metrics"]["mse"], rel=1e-5
    )


@pytest.mark.parametrize(
    "trainer, limit",
    [
        ({}, None),
        ({"fast_dev_run": True}, 1),
        ({"fast_dev_run": 3}, 3),
        ({"fast_dev_run": False, "limit_test_batches": 0.25}, 0.25),
        ({"limit_test_batches": 2}, 2),
        ({"limit_test_batches": 1.0}, None),
    ],
)
def test_the_batch_limit_is_the_trainers_test_limit(trainer, limit):
    assert batch_limit(trainer) == limit


@pytest.mark.parametrize("off", [0, 0.0])
def test_a_grid_without_test_batches_is_explained(off):
    with pytest.raises(ConfigError, match=r"limit_test_batches=0(\.0)? turns the test off"):
        batch_limit({"limit_test_batches": off})


def test_the_debug_configs_limit_the_grid():
    assert batch_limit(compose_cfg(["debug=fdr"]).trainer) == 1
    assert batch_limit(compose_cfg(["debug=limit"]).trainer) == 0.25
    assert batch_limit(compose_cfg([]).trainer) is None


def test_a_limited_grid_evaluates_the_first_batches_only():
    w = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5, -1.0, 3.0])}
    dm, task = Frames({"a": (2,), "b": (3,)}, w, n=40), Task(LinearSum(w))
    grid = {"levels": [0.0, 0.5, 1.0], "noise": ["white"], "scopes": ["all", "each"], "batch_size": 8}
    full = run_grid(task, dm, grid)
    assert "limit_batches" not in full
    # the first 8 / 16 samples of the same split: the same seeded noise per sample index
    head = Frames({"a": (2,), "b": (3,)}, w, n=40)
    for limit, n in ((1, 8), (0.5, 16), (0.01, 8)):  # a share keeps at least one batch
        got = run_grid(task, dm, grid, limit)
        head.test_set = TensorDictDataset(
            {m: dm.test_set.inputs[m][:n] for m in dm.modalities}, dm.test_set.target[:n]
        )
        want = run_grid(task, head, grid)
        assert got["limit_batches"] == limit
        for scope in ("all", "a", "b"):
            assert got["curves"][scope]["metrics"] == want["curves"][scope]["metrics"]
            assert got["curves"][scope]["metrics"] != full["curves"][scope]["metrics"]


def test_drop_curves_match_the_expected_errors():
    w = {"s": torch.ones(6, 2)}  # one (time=6, features=2) sequence per sample, y = sum of its values
    dm, task = Frames({"s": (6, 2)}, w), Task(LinearSum(w))
    feat = run_grid(task, dm, {"levels": [0.0, 0.3], "noise": ["feature_drop"]})["curves"]["all"]["metrics"][
        "mse"
    ]
    steps = run_grid(task, dm, {"levels": [0.0, 0.3], "noise": ["timestep_drop"]})["curves"]["all"][
        "metrics"
    ]["mse"]
    assert feat[1] == pytest.approx(0.3 * 12, rel=0.08)  # each of 12 values dropped w.p. p: E = p * 12
    assert steps[1] == pytest.approx(0.3 * 12, rel=0.1)  # each step (2 values) dropped w.p. p: E = p * 6 * 2


def test_stock_noise_is_applied_before_quantisation(tmp_path):
    from test_stocks import module, write_prices

    folder = tmp_path / "stocks"
    write_prices(folder, n_days=40)
    dm = module(folder, quantize=True, quantize_levels=5)
    clean = dm.robustness_set(Corruption(["white"], 0.0, dm.modalities))
    for i in range(len(dm.test_set)):
        ref, got = dm.test_set[i], clean[i]
        assert all(torch.equal(ref["inputs"][m], got["inputs"][m]) for m in dm.modalities)
    noisy = dm.robustness_set(Corruption(["white"], 0.7, dm.modalities))[0]
    values = torch.cat([noisy["inputs"][m] for m in dm.modalities]).unique()
    assert len(values) <= 6  # noisy returns, then the window's 5-step quantisation: at most 6 distinct values
    assert not torch.equal(noisy["inputs"][dm.modalities[0]], dm.test_set[0]["inputs"][dm.modalities[0]])


def test_evaluation_builds_no_autograd_graph():
    w = {"a": torch.tensor([1.0, 2.0])}
    model = LinearSum(w)
    seen = []
    model.register_forward_hook(lambda mod, args, out: seen.append(out.logits.requires_grad))
    evaluate(model, Frames({"a": (2,)}, w, n=16).test_set, "regression", 1, 8)
    assert seen == [False, False]


def test_evaluate_agrees_with_the_trainer_test_and_the_record_holds_the_curves(tmp_path):
    cfg = compose_cfg(
        [
            "dataset=synthetic",
            "fusion=concat",
            *FAST,
            "trainer.max_epochs=2",
            "robustness=gaussian",
            "robustness.levels=[0.0,0.5,1.0]",
        ],
        output_dir=tmp_path / "run",
    )
    _, objs = train(cfg)
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    rob = record["robustness"]
    assert (
        rob["levels"] == [0.0, 0.5, 1.0]
        and rob["noise"] == ["gaussian"]
        and set(rob["scales"]) == set(objs["datamodule"].modalities)
    )
    assert set(rob["curves"]) == {"all", *objs["datamodule"].modalities}
    acc = rob["curves"]["all"]["metrics"]["acc"]
    assert acc[0] == pytest.approx(record["metrics"]["test/acc"], abs=1e-6)  # level 0 = the clean test split
    assert acc[2] < acc[0]  # noise of one std on every modality hurts a model that learned the task
    clean = evaluate(objs["task"].model, objs["datamodule"].test_set, "multiclass", 3, 64)
    assert clean["acc"] == pytest.approx(record["metrics"]["test/acc"], abs=1e-6)


def test_a_test_limited_run_limits_its_robustness_curves_alike(tmp_path):
    cfg = compose_cfg(
        [
            "dataset=synthetic",
            "fusion=concat",
            *FAST,
            "trainer.max_epochs=1",
            "+trainer.limit_test_batches=1",
            "dataset.batch_size=16",
            "robustness=gaussian",
            "robustness.levels=[0.0,1.0]",
            "robustness.batch_size=16",
        ],
        output_dir=tmp_path / "run",
    )
    _, objs = train(cfg)
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    rob = record["robustness"]
    assert rob["limit_batches"] == 1
    # level 0 is the trainer's test: the same first batch of 16 of the 64 test samples
    assert rob["curves"]["all"]["metrics"]["acc"][0] == pytest.approx(record["metrics"]["test/acc"], abs=1e-6)
    first = TensorDictDataset(
        {m: x[:16] for m, x in objs["datamodule"].test_set.inputs.items()},
        objs["datamodule"].test_set.target[:16],
    )
    assert evaluate(objs["task"].model, first, "multiclass", 3, 16)["acc"] == pytest.approx(
        record["metrics"]["test/acc"], abs=1e-6
    )


def test_robustness_table_from_records(tmp_path):
    from fusionbench.tables.build import build_tables

    levels = [0.0, 0.4, 0.8]

    def write(exp, seed, curve, mse):
        run = tmp_path / "results" / "runs" / exp / f"seed={seed}"
        run.mkdir(parents=True)
        rec = {
            "status": "complete",
            "experiment_name": exp,
            "seed": seed,
            "metrics": {"test/mse": mse},
            "robustness": {
                "levels": levels,
                "noise": ["white"],
                "seed": 0,
                "curves": {"all": {"metrics": {"mse": curve}}},
            },
        }
        (run / "metrics.json").write_text(json.dumps(rec))

    write("base", 0, [1.0, 2.0, 3.0], 1.0)
    write("base", 1, [1.0, 2.0, 5.0], 1.0)
    write("pro", 0, [1.0, 1.0, 1.0], 1.0)
    tables = tmp_path / "tables"
    tables.mkdir()
    (tables / "t.yaml").write_text(
        json.dumps(
            {
                "name": "t",
                "title": "T",
                "kind": "robustness",
                "robust_metric": "mse",
                "baseline": "base",
                "seeds": 2,
                "metrics": [{"key": "test/mse", "label": "MSE"}],
                "rows": [
                    {"label": "Base", "experiment": "base", "group": "g"},
                    {"label": "Pro-Base", "experiment": "pro", "group": "g", "reported": {"robustness": 0.9}},
                    {"label": "Absent", "experiment": "absent", "group": "g"},
                ],
            }
        )
    )
    md = build_tables(tables, tmp_path / "out", tmp_path)["t"]
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in md.splitlines()
        if line.startswith("| ")
    }
    # base AUCs: 0.4*1.5 + 0.4*2.5 = 1.6 and 0.4*1.5 + 0.4*3.5 = 2.0 -> 1.8 ± 0.283; tau(base) = 0
    assert (
        rows["Base"][:3] == ["g", "2/2", "1.000 ± 0.000"]
        and rows["Base"][3] == "1.800 ± 0.283"
        and rows["Base"][4].startswith("0.000")
    )
    # pro: AUC 0.8; tau = -(0.8 - 1.8) = 1.0; scaled: base 0, pro 1
    assert rows["Pro-Base"][3] == "0.800" and rows["Pro-Base"][4] == "1.000" and rows["Pro-Base"][5] == "1.00"
    assert rows["Base"][5] == "0.00" and rows["Pro-Base"][6] == "0.900"
    assert rows["Absent"][1] == "0/2" and rows["Absent"][3] == "—"
    assert "baseline **Base**" in md and "[0.0, 0.4, 0.8]" in md and "Absent g: 0/2" in md
    csv = (tmp_path / "out" / "t.csv").read_text().splitlines()
    assert csv[0].endswith("mse@0,mse@0.4,mse@0.8") and csv[1].endswith("1,2,4")  # the mean curve of Base
    assert (tmp_path / "out" / "t.png").stat().st_size > 1000


def test_a_checkpoint_is_evaluated_under_a_grid_without_training(tmp_path):
    base = ["dataset=synthetic", "fusion=concat", *FAST, "trainer.max_epochs=2"]
    first, _ = train(compose_cfg(base, output_dir=tmp_path / "train"))
    ckpt = next((tmp_path / "train" / "checkpoints").glob("epoch*.ckpt"))
    cfg = compose_cfg(
        [
            *base,
            "train=false",
            f"ckpt_path={ckpt}",
            "robustness=feature_drop",
            "robustness.levels=[0.0,0.9]",
            "robustness.scopes=[all]",
        ],
        output_dir=tmp_path / "eval",
    )
    result, objs = train(cfg)
    acc = result["robustness"]["curves"]["all"]["metrics"]["acc"]
    assert acc[0] == pytest.approx(
        first["metrics"]["test/acc"], abs=1e-6
    )  # the same weights as the trained run's test
    assert acc[1] < acc[0]
    assert objs["trainer"].global_step == 0
