"""Stacked encoders (fusionbench/encoders/stacked.py): N per-stock Transformers run as one batched computation
give the outputs and gradients of the N per-stock modules on the same weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fusionbench.encoders.stacked as stacked
from fusionbench.encoders import LSTMEncoder, TransformerSeqEncoder
from fusionbench.encoders.stacked import encode_all, encode_stacked, stack_key
from fusionbench.fusion import ConcatFusion, ProFusion
from tests.conftest import compose_cfg


def encoders(n: int = 4, context_dim: int | None = None, **kw) -> dict[str, TransformerSeqEncoder]:
    torch.manual_seed(0)
    args = {"in_features": 1, "dim": 9, "heads": 3, "layers": 2, "ff": 32, "max_len": 20, **kw}
    out = {f"s{i}": TransformerSeqEncoder(**args) for i in range(n)}
    for e in out.values():
        if context_dim:
            e.attach_context(context_dim)
        for p in e.parameters():  # away from PyTorch's init, whose zero biases would hide a bias mix-up
            p.data.add_(0.1 * torch.randn_like(p))
    return out


def no_dropout(modules) -> None:
    for e in modules:
        for m in e.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
            if isinstance(m, nn.MultiheadAttention):
                m.dropout = 0.0


def per_encoder(encs, x, ctx):
    return {m: encs[m](x[m], ctx.get(m)) for m in sorted(encs)}


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"positions": "sinusoidal", "pool": "mean"},
        {"positions": "learned"},
        {"in_features": 2, "dim": 6, "heads": 2, "layers": 3},
    ],
)
@pytest.mark.parametrize("with_context", [False, True])
def test_stacked_outputs_are_the_per_encoder_outputs(kw, with_context):
    encs = encoders(context_dim=5 if with_context else None, **kw)
    for e in encs.values():
        e.eval()
    f = kw.get("in_features", 1)
    x = {m: torch.randn(3, 20, f) for m in encs}
    ctx = {m: torch.randn(3, 5) for m in encs} if with_context else {}
    got = encode_stacked(list(encs.values()), list(x.values()), [ctx.get(m) for m in encs])
    want = per_encoder(encs, x, ctx)
    assert got.shape == (4, 3, encs["s0"].dim)
    for i, m in enumerate(encs):
        assert torch.allclose(got[i], want[m], atol=1e-5), m


def test_stacked_gradients_reach_each_encoders_own_parameters():
    encs = encoders(context_dim=4)
    no_dropout(encs.values())
    x = {m: torch.randn(2, 15) for m in encs}
    ctx = {m: torch.randn(2, 4, requires_grad=True) for m in encs}
    weights = torch.randn(len(encs), 2, 9)

    def grads(fn) -> list[torch.Tensor]:
        for e in encs.values():
            e.zero_grad()
        out = fn()
        (torch.stack([out[m] for m in sorted(encs)]) * weights).sum().backward()
        g = [p.grad.clone() for m in sorted(encs) for p in encs[m].parameters()]
        g += [ctx[m].grad.clone() for m in sorted(encs)]
        for c in ctx.values():
            c.grad = None
        return g

    got = grads(lambda: encode_all(encs, sorted(encs), x, ctx))
    want = grads(lambda: per_encoder(encs, x, ctx))
    assert len(got) == len(want) and all(g.abs().sum() > 0 for g in got[:3])
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5)


def test_training_mode_dropout_is_drawn_once_for_the_stack_and_still_drops():
    """With dropout the stack draws its own masks: outputs differ from evaluation but keep its scale."""
    encs = encoders(n=3, dropout=0.5)
    x = {m: torch.randn(8, 20) for m in encs}
    train = encode_all(encs, sorted(encs), x, {})
    for e in encs.values():
        e.eval()
    evaluated = encode_all(encs, sorted(encs), x, {})
    assert all(not torch.allclose(train[m], evaluated[m]) for m in encs)
    assert all(torch.isfinite(train[m]).all() for m in encs)


def test_only_encoders_of_one_shape_and_input_are_stacked(monkeypatch):
    calls: list[int] = []
    real = stacked.encode_stacked
    monkeypatch.setattr(stacked, "encode_stacked", lambda e, x, c: calls.append(len(e)) or real(e, x, c))
    encs = encoders(n=3)
    encs["z_other"] = TransformerSeqEncoder(1, 6, 3, 2, ff=32)  # another width: runs alone
    encs["z_lstm"] = LSTMEncoder(1, 4)
    x = {m: torch.randn(2, 10) for m in encs}
    x["s2"] = torch.randn(2, 12)  # another length: runs alone
    out = encode_all(encs, sorted(encs), x, {})
    assert calls == [2]
    assert set(out) == set(encs)
    encs["s0"].stack = False
    assert stack_key(encs["s0"], x["s0"], None) is None
    calls.clear()
    encode_all(encs, sorted(encs), x, {})
    assert calls == []
    encs["s0"].stack = True
    encs["s1"].eval()  # a frozen encoder beside training ones keeps its own mode: no stack
    encode_all(encs, sorted(encs), x, {})
    assert calls == []


def test_the_stock_lf_transformer_and_its_pro_fusion_run_stacked_with_the_per_stock_outputs(monkeypatch):
    """The real configs: backbone=stocks_transformer on F&B's 13 tickers, base and Pro-Fusion (R = 2: the
    context of step 2 joins every stock's stacked projection)."""
    cfg = compose_cfg(["dataset=stocks", "backbone=stocks_transformer", "backbone._default_.ff=16"])
    calls: list[int] = []
    real = stacked.encode_stacked
    monkeypatch.setattr(stacked, "encode_stacked", lambda e, x, c: calls.append(len(e)) or real(e, x, c))
    from hydra.utils import instantiate

    from fusionbench.train import build_encoders

    dm = instantiate(cfg.dataset, _convert_="all")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    x = {m: v[:4] for m, v in batch["inputs"].items()}
    for wrap in (False, True):
        torch.manual_seed(0)
        encs = build_encoders(cfg.backbone, dm)
        assert len(encs) == 13
        if wrap:
            model = ProFusion(encs, 1, base="concat", context_dim=16)
            for w in model.backproject.values():
                nn.init.normal_(w.weight)
        else:
            model = ConcatFusion(encs, 1)
        model.eval()
        calls.clear()
        with torch.no_grad():
            got = model(x).logits
            assert calls == [13] * (2 if wrap else 1)
            for e in encs.values():
                e.stack = False
            want = model(x).logits
        assert torch.allclose(got, want, atol=1e-5)
