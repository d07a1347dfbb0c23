"""Sequence encoders (LSTM, Transformer) and early fusion of aligned sequences (MultiBench finance models)."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_cfg
from torch import nn

from fusionbench.encoders import LSTMEncoder, TransformerSeqEncoder
from fusionbench.errors import ConfigError
from fusionbench.fusion import ConcatFusion, EarlySequenceFusion, ProFusion
from fusionbench.train import build, train

T = 20


def series(b: int = 4, t: int = T, f: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, t, f, generator=torch.Generator().manual_seed(seed))


def stocks(names=("b", "a", "c"), b: int = 4) -> dict[str, torch.Tensor]:
    return {m: series(b, seed=i) for i, m in enumerate(names)}


def make_encoder(kind: str, in_features: int = 1) -> nn.Module:
    if kind == "lstm":
        return LSTMEncoder(in_features, hidden=6)
    return TransformerSeqEncoder(
        in_features, dim=6, heads=3, layers=2, ff=16, dropout=0.1, positions="learned", max_len=T
    )


# ---------------------------------------------------------------- encoders


def test_shapes():
    x = series()
    assert LSTMEncoder(1, 16)(x).shape == (4, 16)
    assert LSTMEncoder(1, 16)(x[..., 0]).shape == (4, 16)  # (B, T) reads as one feature per step
    assert LSTMEncoder(3, 8, layers=2)(series(f=3)).shape == (4, 8)
    for positions in ("none", "sinusoidal", "learned"):
        for pool in ("last", "mean"):
            enc = TransformerSeqEncoder(1, 9, 3, 3, ff=32, positions=positions, max_len=T, pool=pool)
            assert enc(x).shape == (4, 9) and enc.output_dim == 9
    with pytest.raises(ValueError, match=r"expects \(batch, time, 2\)"):
        LSTMEncoder(2, 4)(x)
    with pytest.raises(ValueError, match="max_len=10"):
        TransformerSeqEncoder(1, 9, positions="sinusoidal", max_len=10)(x)


def test_lstm_output_is_the_last_hidden_state_of_a_plain_lstm():
    torch.manual_seed(0)
    enc = LSTMEncoder(3, 5, layers=2)
    ref = nn.LSTM(3, 5, 2)  # time-major, as MultiBench's LSTM
    ref.load_state_dict(enc.lstm.state_dict())
    x = series(f=3)
    _, (h, _) = ref(x.transpose(0, 1))
    assert torch.allclose(enc(x), h[-1], atol=1e-6)


def test_lstm_context_equals_concatenating_it_to_every_time_step():
    torch.manual_seed(0)
    enc = LSTMEncoder(2, 5, layers=2)
    enc.attach_context(3, layer=0)
    x, c = series(f=2), torch.randn(4, 3)
    wide = nn.LSTM(2 + 3, 5, 2, batch_first=True)
    state = dict(enc.lstm.state_dict())
    state["weight_ih_l0"] = torch.cat([state["weight_ih_l0"], enc.context_join.proj.weight], dim=1)
    wide.load_state_dict(state)
    out, _ = wide(torch.cat([x, c[:, None, :].expand(4, T, 3)], dim=-1))
    assert torch.allclose(enc(x, c), out[:, -1], atol=1e-6)
    assert torch.allclose(enc(x, torch.zeros(4, 3)), enc(x), atol=1e-6)  # c = 0: the plain encoder
    with pytest.raises(ConfigError, match="0..0"):
        LSTMEncoder(1, 4).attach_context(3, layer=1)


def test_transformer_context_equals_concatenating_it_to_every_time_step():
    torch.manual_seed(0)
    enc = TransformerSeqEncoder(2, dim=6, heads=3, layers=2, ff=16, positions="sinusoidal", max_len=T).eval()
    enc.attach_context(3, layer=0)
    x, c = series(f=2), torch.randn(4, 3)
    wide = nn.Linear(2 + 3, 6, bias=False)  # MultiBench's Conv1d(n + 3, 9, 1, bias=False) on [x_t ; c]
    wide.weight.data = torch.cat([enc.proj.weight, enc.context_join.proj.weight], dim=1)
    h = wide(torch.cat([x, c[:, None, :].expand(4, T, 3)], dim=-1))
    expected = enc.encoder(enc.positions(h))[:, -1]
    assert torch.allclose(enc(x, c), expected, atol=1e-5)
    assert torch.allclose(enc(x, torch.zeros(4, 3)), enc(x), atol=1e-6)


# ---------------------------------------------------------------- early fusion of sequences


def test_early_sequence_stacks_in_sorted_order():
    torch.manual_seed(0)
    joint = LSTMEncoder(3, 6)
    model = EarlySequenceFusion({m: LSTMEncoder(1, 4) for m in ("b", "a", "c")}, 1, encoder=joint).eval()
    x = stocks()
    stacked = torch.cat([x["a"], x["b"], x["c"]], dim=-1)
    assert torch.equal(model.stack(x), stacked)
    expected = model.head(joint(stacked))
    assert torch.allclose(model(x).logits, expected)
    reordered = {m: x[m] for m in ("c", "a", "b")}  # dict order does not matter
    assert torch.allclose(model(reordered).logits, expected)
    swapped = {"a": x["b"], "b": x["a"], "c": x["c"]}  # which series is which does
    assert not torch.allclose(model(swapped).logits, expected)
    assert list(model.encoders) == ["joint"] and model.fused_dim == 6
    assert model.head[-1].in_features == 6 and model.head[-1].out_features == 1


def test_early_sequence_builds_its_encoder_from_a_partial_or_a_node():
    from functools import partial

    encoders = {m: LSTMEncoder(1, 4) for m in "abc"}
    m1 = EarlySequenceFusion(
        encoders, 1, encoder=partial(TransformerSeqEncoder, dim=6, heads=3, layers=1, ff=8)
    )
    m2 = EarlySequenceFusion(
        encoders, 1, encoder={"_target_": "fusionbench.encoders.LSTMEncoder", "hidden": 7}
    )
    assert m1.encoders["joint"].in_features == 3 and m1.fused_dim == 6
    assert m2.encoders["joint"].in_features == 3 and m2.fused_dim == 7
    assert m1(stocks("abc")).logits.shape == m2(stocks("abc")).logits.shape == (4, 1)
    with pytest.raises(ConfigError, match="takes 2 features per step; the stacked inputs have 3"):
        EarlySequenceFusion(encoders, 1, encoder=LSTMEncoder(2, 4))
    with pytest.raises(ConfigError, match="equally long"):
        m2({"a": series(), "b": series(), "c": series(t=T + 1)})


# ---------------------------------------------------------------- Pro-Fusion around both


@pytest.mark.parametrize("kind", ["lstm", "transformer"])
@pytest.mark.parametrize("base", ["concat", "early_sequence"])
def test_profusion_wraps_sequence_models(kind, base):
    torch.manual_seed(0)
    encoders = {m: make_encoder(kind) for m in ("b", "a", "c")}
    base_args = {}
    if base == "early_sequence":
        base_args = {"encoder": {"hidden": 6}}
        if kind == "transformer":  # a whole node: merging into early_sequence.yaml would keep the LSTM's keys
            base = {
                "_target_": "fusionbench.fusion.EarlySequenceFusion",
                "encoder": {
                    "_target_": "fusionbench.encoders.TransformerSeqEncoder",
                    "_partial_": True,
                    "dim": 6,
                    "heads": 3,
                    "layers": 2,
                    "ff": 16,
                    "positions": "learned",
                    "max_len": T,
                },
            }
            base_args = {}
    model = ProFusion(encoders, 1, base=base, base_args=base_args, unroll_steps=2, context_dim=4)
    assert sorted(model.encoders) == (["a", "b", "c"] if base == "concat" else ["joint"])
    x = stocks()
    out = model(x)
    assert out.logits.shape == (4, 1)
    nn.functional.mse_loss(out.logits, torch.randn(4, 1)).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    # W = 0: the wrapper is exactly its base model
    model.eval()
    with torch.no_grad():
        for w in model.backproject.values():
            w.weight.zero_()
        assert torch.allclose(model(x).logits, model.base(x).logits, atol=1e-6)


def test_profusion_early_sequence_step_two_is_the_joint_lstm_on_stacked_inputs_and_context():
    """Eqs. 7-9 by hand: step 2 encodes [x_1 .. x_n ; W c_1] at every time step with the joint LSTM."""
    torch.manual_seed(0)
    model = ProFusion(
        {m: LSTMEncoder(1, 4) for m in "abc"},
        1,
        base="early_sequence",
        base_args={"encoder": {"hidden": 5}},
        unroll_steps=2,
        context_dim=3,
    ).eval()
    base, x = model.base, stocks("abc")
    joint = base.encoders["joint"]
    stacked = torch.cat([x["a"], x["b"], x["c"]], dim=-1)
    c1 = joint(stacked)  # c_0 = 0: the plain joint LSTM; the fused vector is its output
    ctx = model.backproject["joint"](c1)
    wide = nn.LSTM(3 + 3, 5, batch_first=True)
    state = dict(joint.lstm.state_dict())
    state["weight_ih_l0"] = torch.cat([state["weight_ih_l0"], joint.context_join.proj.weight], dim=1)
    wide.load_state_dict(state)
    h, _ = wide(torch.cat([stacked, ctx[:, None, :].expand(4, T, 3)], dim=-1))
    assert torch.allclose(model(x).logits, base.head(h[:, -1]), atol=1e-6)


# ---------------------------------------------------------------- configs and the training entry point


def test_stocks_backbones_are_per_ticker_sequence_encoders():
    for dataset, suffix in (("stocks", ""), ("stocks_health", "_health"), ("stocks_tech", "_tech")):
        for backbone, cls in ((dataset, LSTMEncoder), (f"stocks_transformer{suffix}", TransformerSeqEncoder)):
            cfg = compose_cfg([f"dataset={dataset}", f"backbone={backbone}", "fusion=concat"])
            dm, task = build(cfg)
            assert isinstance(task.model, ConcatFusion)
            encoders = task.model.encoders
            assert sorted(encoders) == sorted(dm.modalities)
            assert all(isinstance(e, cls) and e.in_features == 1 for e in encoders.values())


@pytest.mark.parametrize(
    "overrides",
    [
        ["fusion=concat"],
        ["fusion=early_sequence", "dataset.tickers=[MCD,SBUX,HSY,HRL]"],
        ["fusion=early_sequence_transformer", "dataset.tickers=[MCD,SBUX,HSY,HRL]"],
        ["fusion=profusion", "fusion.base=early_sequence", "dataset.tickers=[MCD,SBUX,HSY,HRL]"],
        # 90 s on 2 cores; the fast suite runs a transformer Pro-Fusion row (pro_t4_*_lftransf_pro)
        pytest.param(
            [
                "fusion=profusion",
                "fusion.base=concat",
                "backbone=stocks_transformer",
                "dataset.tickers=[MCD,SBUX,HSY,HRL]",
            ],
            marks=pytest.mark.slow,
        ),
    ],
)
def test_fast_dev_run_on_the_stock_snapshot(overrides, tmp_path):
    cfg = compose_cfg(
        ["dataset=stocks", "debug=fdr", "logger=none", "trainer.enable_progress_bar=false", *overrides],
        tmp_path,
    )
    result, objs = train(cfg)
    assert objs["trainer"].global_step == 1
    assert "test/loss" in result["metrics"]


@pytest.mark.parametrize("fusion", ["early_sequence", "early_sequence_transformer"])
def test_early_sequence_configs_build_on_aligned_synthetic_series(fusion):
    """The overrides the generic every-fusion tests need for these configs (synthetic data is not aligned)."""
    shapes = "dataset.shapes={audio: [12, 1], image: [12, 1], text: [12, 1]}"
    dm, task = build(compose_cfg(["dataset=synthetic", f"fusion={fusion}", shapes]))
    batch = next(iter(dm.train_dataloader()))
    assert task(batch["inputs"]).logits.shape == (32, 3)
