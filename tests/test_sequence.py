"""Sequence encoders (LSTM, GRU, Transformer) and early fusion of aligned sequences (MultiBench finance and
affect models; the affect rows end to end: test_affect_baselines.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_cfg
from torch import nn

from fusionbench.encoders import GRUEncoder, LSTMEncoder, TransformerSeqEncoder
from fusionbench.errors import ConfigError
from fusionbench.fusion import ConcatFusion, EarlySequenceFusion, ProFusion
from fusionbench.fusion.base import require_equal_dims
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


# ---------------------------------------------------------------- GRU (MultiBench affect GRU / GRUWithLinear)


def left_padded(b: int = 4, t: int = T, f: int = 3, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """A batch left-padded with zero steps, as the MOSI/MOSEI pickles store it; returns the real lengths."""
    x = series(b, t, f, seed)
    lengths = [t, t - 5, 3, 1][:b]
    for i, n in enumerate(lengths):
        x[i, : t - n] = 0
    return x, lengths


def test_gru_shapes_and_width_key():
    x = series(f=3)
    assert GRUEncoder(3, 16)(x).shape == (4, 16)
    assert GRUEncoder(1, 16)(x[..., 0]).shape == (4, 16)  # (B, T) reads as one feature per step
    assert GRUEncoder(3, 8, layers=2, dropout=0.1)(x).shape == (4, 8)
    with_linear = GRUEncoder(3, 16, out_features=5)
    assert with_linear(x).shape == (4, 5) and with_linear.output_dim == 5
    assert GRUEncoder(3, 16).width_key == "hidden" and with_linear.width_key == "out_features"
    with pytest.raises(ConfigError, match=r"`backbone.a.hidden`=16, `backbone.b.out_features`=5"):
        require_equal_dims({"a": 16, "b": 5}, "Sum fusion", {"a": GRUEncoder(3, 16), "b": with_linear})
    with pytest.raises(ValueError, match=r"GRUEncoder expects \(batch, time, 2\)"):
        GRUEncoder(2, 4)(x)


def test_gru_output_is_the_last_hidden_state_of_a_plain_gru():
    torch.manual_seed(0)
    enc = GRUEncoder(3, 5, layers=2)
    ref = nn.GRU(3, 5, 2)  # time-major, as nn.GRU's default
    ref.load_state_dict(enc.gru.state_dict())
    x = series(f=3)
    _, h = ref(x.transpose(0, 1))
    assert torch.allclose(enc(x), h[-1], atol=1e-6)


def test_gru_by_hand():
    """r = s(W_ir x + b_ir + W_hr h + b_hr), z = s(W_iz x + ...), n = tanh(W_in x + b_in + r (W_hn h + b_hn)),
    h' = (1 - z) n + z h, from h_0 = 0; output the last h."""
    torch.manual_seed(0)
    enc = GRUEncoder(3, 4)
    g = enc.gru
    w_ir, w_iz, w_in = g.weight_ih_l0.chunk(3)
    w_hr, w_hz, w_hn = g.weight_hh_l0.chunk(3)
    b_ir, b_iz, b_in = g.bias_ih_l0.chunk(3)
    b_hr, b_hz, b_hn = g.bias_hh_l0.chunk(3)
    x = series(f=3)
    h = torch.zeros(4, 4)
    for t in range(T):
        xt = x[:, t]
        r = torch.sigmoid(xt @ w_ir.T + b_ir + h @ w_hr.T + b_hr)
        z = torch.sigmoid(xt @ w_iz.T + b_iz + h @ w_hz.T + b_hz)
        n = torch.tanh(xt @ w_in.T + b_in + r * (h @ w_hn.T + b_hn))
        h = (1 - z) * n + z * h
    assert torch.allclose(enc(x), h, atol=1e-5)


def test_gru_with_linear_is_multibench_gru_with_linear():
    """MultiBench's GRUWithLinear(dropout=True): Linear(Dropout(h_T)); in eval Linear(h_T)."""
    torch.manual_seed(0)
    enc = GRUEncoder(3, 6, out_features=2, out_dropout=0.5)
    x = series(f=3)
    h_last = enc.gru(x)[0][:, -1]
    enc.eval()
    assert torch.allclose(enc(x), enc.linear(h_last), atol=1e-6)
    enc.train()
    torch.manual_seed(1)
    out = enc(x)
    torch.manual_seed(1)
    dropped = nn.functional.dropout(h_last, 0.5, training=True)  # the GRU itself draws no random numbers
    assert torch.allclose(out, enc.linear(dropped), atol=1e-6)
    assert not torch.allclose(out, enc.linear(h_last))


def test_gru_skip_padding_is_multibench_packed_sequences():
    """skip_padding: the state after each sample's real steps only, exactly what MultiBench's
    GRU(has_padding=True) gets from its loader (leading padding cut, end-padded, packed)."""
    torch.manual_seed(0)
    enc = GRUEncoder(3, 5, layers=2, skip_padding=True)
    x, lengths = left_padded()
    real = [x[i, T - n :] for i, n in enumerate(lengths)]
    packed = nn.utils.rnn.pack_padded_sequence(
        nn.utils.rnn.pad_sequence(real, batch_first=True), torch.tensor(lengths), True, enforce_sorted=False
    )
    assert torch.allclose(enc(x), enc.gru(packed)[1][-1], atol=1e-6)
    plain = GRUEncoder(3, 5, layers=2)
    plain.load_state_dict(enc.state_dict())
    assert not torch.allclose(plain(x)[1:], enc(x)[1:], atol=1e-3)  # the zero steps do move a plain GRU
    assert torch.allclose(plain(x)[0], enc(x)[0], atol=1e-6)  # no padding: the same
    x[3] = 0  # an all-zero sample: one zero step
    assert torch.allclose(enc(x)[3], enc.gru(x[3:, -1:])[1][-1, 0], atol=1e-6)


@pytest.mark.parametrize("skip_padding", [False, True])
def test_gru_context_equals_concatenating_it_to_every_time_step(skip_padding):
    torch.manual_seed(0)
    enc = GRUEncoder(2, 5, layers=2, out_features=3, skip_padding=skip_padding).eval()
    enc.attach_context(3, layer=0)
    assert enc.context_join.proj.weight.shape == (15, 3)  # reset, update, candidate blocks
    x, lengths = left_padded(f=2)
    c = torch.randn(4, 3)
    wide = nn.GRU(2 + 3, 5, 2, batch_first=True)
    state = dict(enc.gru.state_dict())
    state["weight_ih_l0"] = torch.cat([state["weight_ih_l0"], enc.context_join.proj.weight], dim=1)
    wide.load_state_dict(state)
    xc = torch.cat([x, c[:, None, :].expand(4, T, 3)], dim=-1)
    if skip_padding:  # the real steps of [x_t ; c] only
        expected = torch.stack([wide(xc[i : i + 1, T - n :])[0][0, -1] for i, n in enumerate(lengths)])
    else:
        expected = wide(xc)[0][:, -1]
    assert torch.allclose(enc(x, c), enc.linear(expected), atol=1e-5)
    assert torch.allclose(enc(x, torch.zeros(4, 3)), enc(x), atol=1e-6)  # c = 0: the plain encoder
    with pytest.raises(ConfigError, match="0..0"):
        GRUEncoder(1, 4).attach_context(3, layer=1)


def test_gru_gradient_reaches_every_parameter_and_the_context():
    torch.manual_seed(0)
    enc = GRUEncoder(2, 5, layers=2, dropout=0.1, out_dropout=0.1, out_features=3, skip_padding=True)
    enc.attach_context(3)
    x, _ = left_padded(f=2)
    x.requires_grad_(True)
    c = torch.randn(4, 3, requires_grad=True)
    enc(x, c).square().sum().backward()
    no_grad = [n for n, p in enc.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert c.grad.abs().sum() > 0 and x.grad[0].abs().sum() > 0
    assert torch.equal(x.grad[2, : T - 3], torch.zeros(T - 3, 2))  # skipped padding gets no gradient


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
