"""Pro-Fusion: exact reduction to the base model, where the context goes, the iterative ablation,
gradients through the unroll, errors; the synthetic study datasets; curve tables."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import FAST
from torch import nn

from fusionbench.data import GenerativeDataModule, LatticeDataModule
from fusionbench.data.lattice import first_nonzero_digit, position_embedding
from fusionbench.encoders import ContextJoin, IdentityEncoder, LeNetEncoder, MLPEncoder
from fusionbench.errors import ConfigError, DatasetError
from fusionbench.fusion import ProFusion
from fusionbench.tables import build_tables

BASES = ["concat", "early", "sum", "weighted_sum", "tensor", "lowrank", "deq", "mmdynamics", "mmdynamics_deq"]


def mlp_encoders() -> dict[str, nn.Module]:
    return {"a": MLPEncoder(5, [8, 8]), "b": MLPEncoder(7, [9, 8])}


def batch(n: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"a": torch.randn(n, 5, generator=g), "b": torch.randn(n, 7, generator=g)}


def zero_backprojection(model: ProFusion) -> None:
    for w in model.backproject.values():
        nn.init.zeros_(w.weight)


@pytest.mark.parametrize("base", BASES)
def test_zero_backprojection_is_exactly_the_base_model(base):
    torch.manual_seed(0)
    model = ProFusion(mlp_encoders(), 3, base=base, unroll_steps=3, context_dim=4).eval()
    zero_backprojection(model)
    x = batch()
    with torch.no_grad():
        assert torch.equal(model(x).logits, model.base(x).logits)
    # with W != 0 the feedback changes the prediction
    for w in model.backproject.values():
        nn.init.normal_(w.weight)
    with torch.no_grad():
        assert not torch.allclose(model(x).logits, model.base(x).logits)


def test_one_unroll_step_is_the_base_model_whatever_w():
    torch.manual_seed(0)
    model = ProFusion(mlp_encoders(), 3, base="concat", unroll_steps=1, context_dim=4).eval()
    x = batch()
    assert torch.equal(model(x).logits, model.base(x).logits)


def test_unroll_follows_eqs_7_to_9_by_hand():
    """Step t+1 encodes [x_i ; W_i c_t] (join at the input); the prediction is P(c_R)."""
    torch.manual_seed(0)
    model = ProFusion(mlp_encoders(), 3, base="concat", unroll_steps=2, context_dim=4).eval()
    x = batch()
    base = model.base
    c1 = torch.cat([base.encoders[m](x[m]) for m in ("a", "b")], dim=1)  # c_0 = 0: plain encoders
    h2 = {}
    for m in ("a", "b"):
        enc = base.encoders[m]
        first, rest = enc.net[0], enc.net[1:]
        ctx = model.backproject[m](c1)
        # concatenation [x ; ctx] into a linear layer with weight [A, B] = the additive join
        joint = nn.Linear(first.in_features + 4, first.out_features)
        joint.weight.data = torch.cat([first.weight, enc.context_join.proj.weight], dim=1)
        joint.bias.data = first.bias
        h2[m] = rest(joint(torch.cat([x[m], ctx], dim=1)))
    expected = base.head(torch.cat([h2["a"], h2["b"]], dim=1))
    assert torch.allclose(model(x).logits, expected, atol=1e-6)


def test_join_at_a_later_layer_leaves_earlier_layers_alone():
    enc = MLPEncoder(5, [8, 6])
    enc.attach_context(3, layer=1)
    x, c = torch.randn(2, 5), torch.randn(2, 3)
    h1 = enc.net[1](enc.net[0](x))  # linear + relu of layer 0, unchanged by the context
    expected = enc.net[4](enc.net[3](h1) + enc.context_join.proj(c))  # (net[2] is dropout)
    assert torch.allclose(enc(x, c), expected)
    assert enc.join_widths() == [8, 6]


def test_conv_join_equals_constant_extra_channels_away_from_the_border():
    torch.manual_seed(0)
    enc = LeNetEncoder(1, 4, 1)
    enc.attach_context(3, layer=0)
    conv = enc.convs[0]
    x, c = torch.randn(2, 1, 12, 12), torch.randn(2, 3)
    # the same conv applied to [x ; c broadcast as channels], extra kernels carrying B / 25
    wide = nn.Conv2d(4, 4, 5, padding=2, bias=False)
    extra = enc.context_join.proj.weight[:, :, None, None].expand(4, 3, 5, 5) / 25
    wide.weight.data = torch.cat([conv.weight, extra], dim=1)
    cat = torch.cat([x, c[:, :, None, None].expand(2, 3, 12, 12)], dim=1)
    joined = enc.join(0, conv(x), c)
    assert torch.allclose(joined[..., 2:-2, 2:-2], wide(cat)[..., 2:-2, 2:-2], atol=1e-5)
    assert ContextJoin(3, 4, 0)(torch.zeros(2, 4), torch.zeros(2, 3)).abs().sum() == 0


def test_identity_encoder_context_is_eq_7_literally():
    enc = IdentityEncoder(4)
    enc.attach_context(2)
    x, c = torch.randn(3, 4), torch.randn(3, 2)
    assert torch.allclose(enc(x, c), x + c @ enc.context_join.proj.weight.T)


def test_iterative_ablation_keeps_modalities_apart():
    """feedback=own: encoder a's later steps never see modality b; Pro-Fusion's do."""
    torch.manual_seed(0)
    x = batch()
    x2 = {"a": x["a"], "b": x["b"] + 1.0}
    for feedback, crosses in (("own", False), ("fused", True)):
        model = ProFusion(
            mlp_encoders(), 3, base="concat", unroll_steps=3, context_dim=4, feedback=feedback
        ).eval()
        emb = model.unroll(x)[-1].embeddings["a"]
        emb2 = model.unroll(x2)[-1].embeddings["a"]
        assert torch.allclose(emb, emb2) is not crosses
        assert model.backproject["a"].in_features == (16 if feedback == "fused" else 8)


def test_gradients_reach_backprojection_and_every_step():
    torch.manual_seed(0)
    model = ProFusion(mlp_encoders(), 3, base="lowrank", unroll_steps=3, context_dim=4)
    out = model(batch())
    nn.functional.cross_entropy(out.logits, torch.tensor([0, 1, 2, 0])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert "pro/context_rms" in out.info


def test_target_loss_follows_the_base():
    assert hasattr(ProFusion(mlp_encoders(), 3, base="mmdynamics"), "target_loss")
    assert not hasattr(ProFusion(mlp_encoders(), 3, base="concat"), "target_loss")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"unroll_steps": 0}, "unroll_steps must be >= 1"),
        ({"feedback": "both"}, "feedback must be one of"),
        ({"join_layer": 5}, "join layer 5"),
        ({"join_layer": {"c": 0}}, "names ['c']"),
        ({"base": "nope"}, "not a fusion Pro-Fusion can wrap"),
        ({"base": "profusion"}, "not a fusion Pro-Fusion can wrap"),
    ],
)
def test_bad_settings_say_what_to_do(kwargs, message):
    with pytest.raises(ConfigError, match=None) as err:
        ProFusion(mlp_encoders(), 3, **kwargs)
    assert message in str(err.value)


def test_encoder_without_context_support_is_refused():
    class Plain(nn.Module):
        output_dim = 3

        def forward(self, x, context=None):
            return x[:, :3]

    with pytest.raises(ConfigError, match="cannot take a context"):
        ProFusion({"a": Plain(), "b": Plain()}, 2, base="concat")


def test_profusion_composes_and_trains_from_the_cli_config(make_cfg):
    from fusionbench.train import train

    cfg = make_cfg(
        ["dataset=synthetic", "fusion=profusion", "fusion.base=lowrank", "fusion.unroll_steps=3", *FAST]
    )
    result, objs = train(cfg)
    model = objs["task"].model
    assert isinstance(model, ProFusion) and model.unroll_steps == 3
    assert type(model.base).__name__ == "LowRankTensorFusion"
    assert math.isfinite(result["metrics"]["test/acc"])


# -- synthetic studies ------------------------------------------------------------------------


def test_first_nonzero_digit_by_hand():
    x = torch.tensor([0.1, 0.19, 0.5, 0.999, 0.0347, 3.2])
    assert first_nonzero_digit(x).tolist() == [1, 1, 5, 9, 3, 3]


def test_lattice_label_is_the_digit_at_the_embedded_position():
    dm = LatticeDataModule(
        lattice_size=8, embedding_dim=6, num_samples={"train": 50, "val": 10, "test": 10}, seed=3
    )
    dm.setup()
    ds = dm.train_set
    f, emb, y = ds.inputs["function"], ds.inputs["position"], ds.target
    assert f.shape == (50, 8) and emb.shape == (50, 6) and f.min() >= 0.1 and f.max() < 1.0
    table = {tuple(e.tolist()): p for p, e in enumerate(position_embedding(torch.arange(8), 6))}
    positions = torch.tensor([table[tuple(e.tolist())] for e in emb])
    assert torch.equal(y, (torch.floor(10 * f[torch.arange(50), positions].double()).long() - 1))
    dm2 = LatticeDataModule(
        lattice_size=8, embedding_dim=6, num_samples={"train": 50, "val": 10, "test": 10}, seed=3
    )
    dm2.setup()
    assert torch.equal(dm2.train_set.inputs["function"], f)


def test_generative_model_follows_eqs_1_to_5():
    kw = dict(
        latent_dim=3,
        x_dims={"x1": 4, "x2": 4},
        y_dim=2,
        num_samples={"train": 64, "val": 8, "test": 8},
        seed=1,
    )
    clean = GenerativeDataModule(eta=0.0, sigma2=0.0, **kw)
    corrupt = GenerativeDataModule(eta=1.5, sigma2=0.0, **kw)
    clean.setup(), corrupt.setup()
    a, b = clean.train_set, corrupt.train_set
    # same Z, W and eps: X_1 differs by exactly -2|eta| sin(W_2 Z) = -3 X_2 when sigma_2 = 0
    assert torch.allclose(b.inputs["x1"] - a.inputs["x1"], -3.0 * a.inputs["x2"], atol=1e-5)
    assert a.inputs["x2"].abs().max() <= 1.0 and a.target.shape == (64, 2)
    assert clean.task_type == "regression" and clean.num_outputs == 2
    with pytest.raises(DatasetError, match="same width"):
        GenerativeDataModule(x_dims={"x1": 4, "x2": 5})


# -- curve tables -----------------------------------------------------------------------------


def _run(root, experiment, seed, **metrics):
    folder = root / "results" / "runs" / experiment / f"seed={seed}"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(
        json.dumps({"status": "complete", "experiment_name": experiment, "seed": seed, "metrics": metrics})
    )


def test_curve_table_pairs_seeds_for_improvement(tmp_path):
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "c.yaml").write_text(
        "name: c\nkind: curve\nimprovement: true\ntitle: C\nseeds: 2\nx: {label: eta, values: [0, 1]}\n"
        "metrics: [{key: test/mse, label: MSE}]\n"
        "rows: [{label: s, experiment: 'pro_eta{x}', baseline: 'base_eta{x}'}]\n"
    )
    _run(tmp_path, "base_eta0", 0, **{"test/mse": 2.0})
    _run(tmp_path, "pro_eta0", 0, **{"test/mse": 1.5})  # +25 %
    _run(tmp_path, "base_eta0", 1, **{"test/mse": 1.0})
    _run(tmp_path, "pro_eta0", 1, **{"test/mse": 1.1})  # -10 %
    _run(tmp_path, "pro_eta1", 0, **{"test/mse": 1.0})  # no baseline for this seed: not counted
    md = build_tables(tmp_path / "tables", tmp_path / "out", tmp_path)["c"]
    row = next(line for line in md.splitlines() if line.startswith("| s |"))
    assert "+7.5 ± 24.7 (2/2)" in row and "— (0/2)" in row
    assert (tmp_path / "out" / "c.png").is_file() and "base_eta0" not in (
        tmp_path / "out" / "c.csv"
    ).read_text()
    assert "to fill them" in md


def test_artifact_curve_reads_probe_files(tmp_path):
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "p.yaml").write_text(
        "name: p\nkind: curve\nartifact: linear_probe.json\ntitle: P\nseeds: 2\n"
        "x: {label: step, values: [1, 2]}\n"
        "metrics: [{key: probe/acc, label: acc, scale: 100, digits: 1}]\n"
        "rows: [{label: image, experiment: run, series: image},\n"
        "       {label: base image, experiment: base, series: image, at: [1]}]\n"
    )
    for seed, (a1, a2) in enumerate([(0.5, 0.6), (0.7, 0.8)]):
        _run(tmp_path, "run", seed)
        probe = {"image": {"1": a1, "2": a2}}
        (tmp_path / "results" / "runs" / "run" / f"seed={seed}" / "linear_probe.json").write_text(
            json.dumps(probe)
        )
    _run(tmp_path, "base", 0)
    (tmp_path / "results" / "runs" / "base" / "seed=0" / "linear_probe.json").write_text(
        json.dumps({"image": {"1": 0.55}})
    )
    md = build_tables(tmp_path / "tables", tmp_path / "out", tmp_path)["p"]
    assert "| image | 60.0 ± 14.1 (2/2) | 70.0 ± 14.1 (2/2) |" in md
    # a base model has step 1 only: its step-2 cell is n/a, not a missing run; seed 1 of step 1 is missing
    assert "| base image | 55.0 (1/2) | n/a |" in md
    assert "n/a: the row has no such point." in md and "1 of 3 points have fewer runs" in md
    csv_rows = (tmp_path / "out" / "p.csv").read_text().splitlines()
    assert [r.split(",")[:3] for r in csv_rows[1:]] == [
        ["image", "run", "1"],
        ["image", "run", "2"],
        ["base image", "base", "1"],
    ]
    (tmp_path / "tables" / "p.yaml").write_text(
        (tmp_path / "tables" / "p.yaml").read_text().replace("at: [1]", "at: [3]")
    )
    with pytest.raises(ValueError, match="`at` .* must be among x.values"):
        build_tables(tmp_path / "tables", tmp_path / "out", tmp_path)


def test_linear_probe_separates_and_tracks_steps():
    from fusionbench.fusion.profusion.probe import linear_probe, probe_accuracy, unrolled_embeddings

    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 3
    x = torch.nn.functional.one_hot(y, 3).double() * 3 + 0.1 * torch.randn(
        200, 3, generator=g, dtype=torch.float64
    )
    assert probe_accuracy((x[:150], y[:150]), (x[150:], y[150:]), 3) == 1.0
    torch.manual_seed(0)
    model = ProFusion(mlp_encoders(), 3, base="concat", unroll_steps=3, context_dim=4)
    x = batch(12)
    batches = [{"inputs": x, "target": torch.arange(12) % 3}]
    acc = linear_probe(model, batches, batches, 3)
    assert sorted(acc) == ["a", "all", "b"] and all(
        len(v) == 3 and all(0.0 <= a <= 1.0 for a in v) for v in acc.values()
    )
    # "all" is the probe of both encoders' outputs side by side, step by step
    feats, labels = unrolled_embeddings(model, batches, 3)
    joint = torch.cat([feats["a"][1], feats["b"][1]], dim=1)
    assert acc["all"][1] == probe_accuracy((joint, labels), (joint, labels), 3)
    # a base model has one step, its encoders' outputs: on the same weights, the Pro model's step 1 (c_0 = 0)
    base = linear_probe(model.base, batches, batches, 3)
    assert base == {m: [v[0]] for m, v in acc.items()}
    with pytest.raises(ConfigError, match="base model with one step.*not 2"):
        linear_probe(model.base, batches, batches, 3, steps=2)
    with pytest.raises(ConfigError, match="need a model with encoders and a fusion step; got Linear"):
        linear_probe(nn.Linear(2, 3), batches, batches, 3)


def test_batch_norm_keeps_running_statistics_per_unroll_step():
    """Step 1 runs without context, so its statistics must equal those of the plain base model on the
    same batches; step 2's differ; eval mode then uses each step's own statistics."""
    torch.manual_seed(0)
    enc = {"a": MLPEncoder(5, [8], norm="batch"), "b": MLPEncoder(7, [8], norm="batch")}
    model = ProFusion(enc, 3, base="concat", unroll_steps=2, context_dim=4)
    for w in model.backproject.values():
        nn.init.normal_(w.weight, std=3.0)  # a context that shifts step 2's activations
    plain = ProFusion(
        {k: MLPEncoder(5 if k == "a" else 7, [8], norm="batch") for k in "ab"},
        3,
        base="concat",
        unroll_steps=1,
    )
    plain.base.load_state_dict(model.base.state_dict(), strict=False)  # (no context joins at R = 1)
    for seed in range(5):
        x = {k: v + seed for k, v in batch(16).items()}
        model(x), plain(x)
    step0, step1 = model.norm0_step0_running_mean, model.norm0_step1_running_mean
    assert torch.allclose(step0, plain.base.encoders["a"].net[1].running_mean)
    assert not torch.allclose(step0, step1, atol=1e-3)
    model.eval()
    model(batch())
    assert model.base.encoders["a"].net[1].running_mean is model.norm0_step1_running_mean  # last step's
    state = model.state_dict()
    assert "norm0_step0_running_mean" in state and "norm0_step1_running_var" in state


def test_deq_diagnostics_reach_through_the_wrapper():
    from fusionbench.fusion.deq.callbacks import deq_diagnostics

    torch.manual_seed(0)
    model = ProFusion(mlp_encoders(), 3, base="deq", unroll_steps=2, context_dim=4)
    diag = deq_diagnostics(model, batch(8), steps=5)
    assert diag is not None and diag["mode"] == "deq" and len(diag["solver_rel_residual"]) == 5
    assert deq_diagnostics(ProFusion(mlp_encoders(), 3, base="concat"), batch(8), steps=5) is None
