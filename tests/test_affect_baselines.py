"""The sequence baselines of MultiBench's affect benchmark (CMU-MOSI / CMU-MOSEI: LF, EF, LRTF, TF, MulT) and
of Pro-Fusion's Tables 2-3 (FLSTM, LFN, and Pro-Fusion around LF / LFN / FLSTM), composed with Hydra as
``python train.py`` does and built on the MultiBench pickle fixtures.

The expected parameter counts are those of MultiBench's own modules (``examples/affect/*.py`` built from
``unimodals/common_models.py``, ``fusions/common_fusions.py``, ``fusions/mult.py`` at 49f9be2, counted once by
instantiating them; LRTF counts its low-rank factors, which MultiBench does not register), and each is
re-derived below from the layer sizes: GRU(i, h) = 3 (h i + h h + 2 h), LSTM(i, h) = 4 (h i + h h + 2 h),
Linear(i, o) = i o + o, MLP(i, h, o) = Linear(i, h) + Linear(h, o)."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_cfg

from fusionbench.data.mosei import make_fixture, write_fixture
from fusionbench.encoders import GRUEncoder, SequenceIdentityEncoder
from fusionbench.errors import ConfigError
from fusionbench.fusion import (
    ConcatFusion,
    EarlySequenceFusion,
    LowRankTensorFusion,
    MulTFusion,
    ProFusion,
    TensorFusion,
)
from fusionbench.task import task_loss
from fusionbench.train import build

MOSEI = {"audio": 74, "text": 300, "vision": 35}
MOSI_DATA = {"audio": 5, "text": 300, "vision": 20}  # mosi_data.pkl (MulT's aligned MOSI)
STEPS = 5  # AdamW steps of the loss-decrease test
SIZES = "dataset.num_samples={train: 24, val: 8, test: 8}"  # the fixture's


def gru(i: int, h: int) -> int:
    return 3 * (h * i + h * h + 2 * h)


def lstm(i: int, h: int) -> int:
    return 4 * (h * i + h * h + 2 * h)


def linear(i: int, o: int) -> int:
    return i * o + o


def mlp(i: int, h: int, o: int) -> int:
    return linear(i, h) + linear(h, o)


def mult_encoder(d: int, layers: int) -> int:
    """MulT's TransformerEncoder: per layer attention 4 d^2 + 4 d, feed-forward d -> 4d -> d, 2 LayerNorms;
    a final LayerNorm."""
    return layers * ((4 * d * d + 4 * d) + linear(d, 4 * d) + linear(4 * d, d) + 4 * d) + 2 * d


def expected_params(row: str, dims: dict[str, int]) -> int:
    a, t, v = dims["audio"], dims["text"], dims["vision"]
    if row == "LF":  # GRU(35,70), GRU(74,200), GRU(300,600) -> MLP(870, 870, 1)
        return gru(v, 70) + gru(a, 200) + gru(t, 600) + mlp(870, 870, 1)
    if row == "EF":  # GRU(409, 512) -> MLP(512, 512, 1)
        return gru(a + t + v, 512) + mlp(512, 512, 1)
    if row == "FLSTM":  # LSTM(409, 512) -> MLP(512, 512, 1)
        return lstm(a + t + v, 512) + mlp(512, 512, 1)
    if row == "LRTF":  # GRUWithLinear to 32/32/128, rank-32 factors (r, d + 1, 128), weights (1, r), bias 128
        enc = gru(v, 64) + linear(64, 32) + gru(a, 128) + linear(128, 32) + gru(t, 512) + linear(512, 128)
        return enc + 32 * (33 + 33 + 129) * 128 + 32 + 128 + mlp(128, 512, 1)
    if row == "TF":  # GRUWithLinear to 4/19/79 -> 5 * 20 * 80 = 8000 -> MLP(8000, 512, 1)
        enc = gru(v, 64) + linear(64, 4) + gru(a, 128) + linear(128, 19) + gru(t, 512) + linear(512, 79)
        return enc + mlp(8000, 512, 1)
    if row == "MulT":  # 9 crossmodal encoders (40, 4 layers), 3 memories (120, 4), projections, residual, out
        return (
            9 * mult_encoder(40, 4)
            + 3 * mult_encoder(120, 4)
            + (a + t + v) * 40
            + 2 * linear(360, 360)
            + linear(360, 1)
        )
    raise KeyError(row)


# row -> (overrides, model class, fused width, MultiBench's parameter count on MOSEI / on mosi_data.pkl)
ROWS = {
    "LF": (
        ["backbone=affect_gru", "fusion=concat", "fusion.head_hidden=[870]"],
        ConcatFusion,
        870,
        (2570311, 2525761),
    ),
    "EF": (
        ["backbone=affect_identity", "fusion=early_sequence_gru"],
        EarlySequenceFusion,
        512,
        (1680897, 1551873),
    ),
    "LRTF": (["backbone=affect_gru_lrtf", "fusion=lfn"], LowRankTensorFusion, 128, (2285345, 2255969)),
    "TF": (
        ["backbone=affect_gru_tf", "fusion=tensor", "fusion.head_hidden=[512]", "fusion.head_dropout=0.0"],
        TensorFusion,
        8000,
        (5488295, 5458919),
    ),
    "MulT": (["backbone=affect_identity", "fusion=mult_affect"], MulTFusion, 360, (3080321, 3076961)),
    "FLSTM": (["backbone=affect_identity", "fusion=early_sequence_flstm"], EarlySequenceFusion, 512, None),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread (two threads on two shared cores thrash), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("affect")
    write_fixture(root / "mosei")
    write_fixture(root / "mosi", file="mosi_data.pkl", data=make_fixture(feature_dims=MOSI_DATA))
    return root


def build_row(data_dir, overrides: list[str], dataset: str = "mosei"):
    data = [f"dataset={dataset}", f"paths.data_dir={data_dir}", SIZES, "optimizer=adamw"]
    if dataset == "mosi":  # the MulT-aligned MOSI pickle with its own widths
        data += ["dataset.file=mosi_data.pkl", "dataset.feature_dims={audio: 5, text: 300, vision: 20}"]
    dm, task = build(compose_cfg([*data, *overrides]))
    batch = next(iter(dm.train_dataloader()))  # the first 6 samples: a fast forward/backward on 2 cores
    return dm, task, {"inputs": {m: x[:6] for m, x in batch["inputs"].items()}, "target": batch["target"][:6]}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def no_gradient(model: torch.nn.Module) -> list[str]:
    """Parameters without a finite gradient, or weights (ndim >= 2) with a zero one. (An output bias under L1
    gets mean(sign(error)), exactly 0 when the errors split evenly, so biases need only a gradient.)"""
    return [
        n
        for n, p in model.named_parameters()
        if p.grad is None or not torch.isfinite(p.grad).all() or (p.ndim >= 2 and not p.grad.abs().sum() > 0)
    ]


def l1(task, batch) -> torch.Tensor:
    out = task(batch["inputs"])
    return task_loss(task.task_type, out.logits, batch["target"], task.regression_loss)


# ---------------------------------------------------------------- every row against MultiBench's sizes


@pytest.mark.parametrize("row", sorted(ROWS))
def test_row_has_multibench_sizes_and_trains_every_parameter(row, data_dir):
    overrides, cls, fused, counts = ROWS[row]
    dm, task, batch = build_row(data_dir, overrides)
    model = task.model
    assert isinstance(model, cls) and model.fused_dim == fused
    assert n_params(model) == expected_params(row, MOSEI)
    if counts is not None:
        assert n_params(model) == counts[0]  # MultiBench's modules, counted
    assert task.regression_loss == "l1" and dm.batch_size == 32
    optimizer = task.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["weight_decay"] == 0.01
    assert optimizer.defaults["lr"] == 1e-3
    loss = l1(task, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert no_gradient(model) == []
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(id(p) in optimized for p in model.parameters())


@pytest.mark.parametrize("row", ["LF", "EF", "LRTF", "TF", "MulT"])
def test_widths_follow_the_mosi_data_pickle(row, data_dir):
    overrides, cls, fused, counts = ROWS[row]
    dm, task, batch = build_row(data_dir, overrides, dataset="mosi")
    assert dm.feature_dims == MOSI_DATA and batch["inputs"]["vision"].shape == (6, 50, 20)
    assert task.model.fused_dim == fused
    assert n_params(task.model) == expected_params(row, MOSI_DATA) == counts[1]
    assert task(batch["inputs"]).logits.shape == (6, 1)


def test_late_fusion_encoders_are_multibench_grus(data_dir):
    """LF: GRU(dropout=True, has_padding=True) = the packed last state with dropout 0.1; LRTF / TF:
    GRUWithLinear(dropout=True) = dropout 0.1 between that state and the Linear."""
    expected = {
        "affect_gru": {"vision": (35, 70, None), "audio": (74, 200, None), "text": (300, 600, None)},
        "affect_gru_lrtf": {"vision": (35, 64, 32), "audio": (74, 128, 32), "text": (300, 512, 128)},
        "affect_gru_tf": {"vision": (35, 64, 4), "audio": (74, 128, 19), "text": (300, 512, 79)},
    }
    fusion = {"affect_gru": "concat", "affect_gru_lrtf": "lfn", "affect_gru_tf": "tensor"}
    for backbone, sizes in expected.items():
        _, task, _ = build_row(data_dir, [f"backbone={backbone}", f"fusion={fusion[backbone]}"])
        for m, (i, h, o) in sizes.items():
            enc = task.model.encoders[m]
            assert isinstance(enc, GRUEncoder) and (enc.in_features, enc.hidden) == (i, h)
            assert enc.output_dim == (o or h) and (enc.linear is None) == (o is None)
            assert enc.skip_padding and enc.out_dropout.p == 0.1 and enc.gru.num_layers == 1


def test_early_fusion_stacks_409_features_per_step(data_dir):
    _, task, batch = build_row(data_dir, ROWS["EF"][0])
    model = task.model.eval()
    joint = model.encoders["joint"]
    assert isinstance(joint, GRUEncoder) and joint.in_features == 409 and joint.hidden == 512
    assert joint.out_dropout.p == 0.0 and not joint.skip_padding  # last_only=True returns before dropout
    x = batch["inputs"]
    stacked = torch.cat([x["audio"], x["text"], x["vision"]], dim=-1)
    assert torch.allclose(model(x).logits, model.head(joint.gru(stacked)[0][:, -1]), atol=1e-5)
    _, flstm, _ = build_row(data_dir, ROWS["FLSTM"][0])
    assert flstm.model.encoders["joint"].lstm.input_size == 409


def test_lfn_factors_are_trained_unlike_multibench(data_dir):
    """MultiBench keeps the LRTF factors in a Python list (never updated on GPU, benchmark-specs §0.5): here
    one AdamW step moves every factor."""
    _, task, batch = build_row(data_dir, ROWS["LRTF"][0])
    model = task.model
    assert sorted(model.factors) == ["audio", "text", "vision"]
    assert {m: tuple(f.shape) for m, f in model.factors.items()} == {
        "audio": (32, 33, 128),
        "text": (32, 129, 128),
        "vision": (32, 33, 128),
    }
    before = {m: f.detach().clone() for m, f in model.factors.items()}
    optimizer = task.configure_optimizers()
    l1(task, batch).backward()
    optimizer.step()
    assert all(not torch.equal(before[m], model.factors[m]) for m in before)


def test_mult_affect_gives_each_modality_its_own_group_and_text_source_dropout(data_dir):
    _, task, batch = build_row(data_dir, ROWS["MulT"][0])
    model = task.model
    assert model.members == {"g0": ["audio"], "g1": ["text"], "g2": ["vision"]}
    assert [model.encoders[g].in_features for g in model.group_names] == [74, 300, 35]
    assert model.cross_attn_dropout == {"g0": 0.0, "g1": 0.1, "g2": 0.0}  # MultiBench [0, 0, 0.1] (v, a, t)
    for i in model.group_names:
        for j, enc in model.cross[i].items():
            assert all(layer.attn.dropout == model.cross_attn_dropout[j] for layer in enc.layers)
            assert len(enc.layers) == 4 and enc.dim == 40
        assert len(model.memory[i].layers) == 4 and model.memory[i].dim == 120  # max(layers, 3)
        assert all(layer.attn.dropout == 0.1 for layer in model.memory[i].layers)
    assert model.memory["g0"].embed_dropout == 0.2 and model.cross["g0"]["g1"].embed_dropout == 0.2
    assert model.out_dropout == 0.1 and model.head[-1].in_features == 360


def test_mult_cross_attn_dropout_mapping_errors():
    encoders = {m: SequenceIdentityEncoder(d) for m, d in MOSEI.items()}
    with pytest.raises(ConfigError, match=r"names \['speech'\], which are neither modalities"):
        MulTFusion(encoders, 1, dim=8, heads=2, cross_attn_dropout={"speech": 0.1})
    pair = {"a": SequenceIdentityEncoder(2), "b": SequenceIdentityEncoder(2), "c": SequenceIdentityEncoder(2)}
    with pytest.raises(ConfigError, match=r"group g0 \(\['a', 'b'\]\) the rates \[0.0, 0.1\]"):
        MulTFusion(
            pair, 1, dim=8, heads=2, group_members=[["a", "b"], ["c"]], cross_attn_dropout={"a": 0.1, "b": 0}
        )
    by_group = MulTFusion(
        pair, 1, dim=8, heads=2, group_members=[["a", "b"], ["c"]], cross_attn_dropout={"g1": 0.2}
    )
    assert by_group.cross_attn_dropout == {"g0": 0.0, "g1": 0.2}
    assert MulTFusion(pair, 1, dim=8, heads=2, cross_attn_dropout=0.3).cross_attn_dropout == {
        "g0": 0.3,
        "g1": 0.3,
        "g2": 0.3,
    }


@pytest.mark.parametrize(
    ("overrides", "cls"),
    [
        (["backbone=affect_identity", "fusion=early_sequence"], EarlySequenceFusion),
        (["backbone=affect_identity", "fusion=mult"], MulTFusion),
        (["backbone=affect_gru", "fusion=lowrank"], LowRankTensorFusion),
        (["backbone=affect_gru_tf", "fusion=tensor"], TensorFusion),
    ],
    ids=["early_sequence", "mult", "lowrank", "tensor"],
)
def test_generic_sequence_fusions_take_modalities_of_different_widths(overrides, cls, data_dir):
    """The stock-sized configs on (B, 50, 74 / 300 / 35) inputs."""
    _, task, batch = build_row(data_dir, overrides)
    assert isinstance(task.model, cls)
    assert task(batch["inputs"]).logits.shape == (6, 1)


# ---------------------------------------------------------------- Pro-Fusion around LF, LFN, FLSTM


@pytest.mark.parametrize(
    ("row", "base", "joins"),
    [
        ("LF", ["fusion.base=concat", "+fusion.base_args.head_hidden=[870]"], 3 * (70 + 200 + 600)),
        ("LRTF", ["fusion.base=lfn"], 3 * (64 + 128 + 512)),
        ("FLSTM", ["fusion.base=early_sequence_flstm"], 4 * 512),
    ],
    ids=["LF", "LFN", "FLSTM"],
)
def test_profusion_wraps_the_affect_rows(row, base, joins, data_dir):
    """Parameters: the base + W_i (fused_dim -> 64) per encoder + each encoder's context join (64 -> its first
    input map: 3 hidden for a GRU, 4 hidden for an LSTM); W = 0 gives the base model."""
    backbone = ROWS[row][0][0]
    _, task, batch = build_row(data_dir, [backbone, "fusion=profusion", *base])
    model = task.model
    assert isinstance(model, ProFusion) and isinstance(model.base, ROWS[row][1])
    assert model.unroll_steps == 2 and model.context_dim == 64
    n_enc = len(model.encoders)
    overhead = n_enc * model.fused_dim * 64 + joins * 64
    assert n_params(model) == expected_params(row, MOSEI) + overhead
    l1(task, batch).backward()
    assert no_gradient(model) == []
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(batch["inputs"]).logits, model.base(batch["inputs"]).logits)
        for w in model.backproject.values():
            w.weight.zero_()
        assert torch.allclose(model(batch["inputs"]).logits, model.base(batch["inputs"]).logits, atol=1e-6)


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("row", ["LF", "LRTF"])
def test_l1_loss_decreases_on_the_fixture(row, data_dir):
    torch.manual_seed(0)
    _, task, batch = build_row(data_dir, ROWS[row][0])
    optimizer = task.configure_optimizers()
    task.eval()
    with torch.no_grad():
        start = l1(task, batch).item()
    task.train()
    for _ in range(STEPS):
        optimizer.zero_grad()
        l1(task, batch).backward()
        optimizer.step()
    task.eval()
    with torch.no_grad():
        end = l1(task, batch).item()
    assert end < 0.9 * start
