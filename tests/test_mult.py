"""MulT (MultiBench's finance Multimodal Transformer): grouping of the stocks, widths and parameter count
against MultiBench's model, a crossmodal block by hand, cross-group dependence and causality, gradients,
Pro-Fusion around it (context at the group projections, W = 0 = the base model), errors, the config."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import compose_cfg
from hydra.utils import instantiate
from torch import nn

from fusionbench.encoders import LSTMEncoder
from fusionbench.errors import ConfigError
from fusionbench.fusion import MulTFusion, ProFusion
from fusionbench.fusion.mult import CrossmodalLayer, sinusoidal_positions, split_groups

B, T = 4, 12


def stocks(n: int = 5, t: int = T, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"s{i:02d}": torch.randn(B, t, 1, generator=g) for i in range(n)}


def model(n: int = 5, **kw) -> MulTFusion:
    torch.manual_seed(0)
    return MulTFusion({m: LSTMEncoder(1, 4) for m in stocks(n)}, 1, **kw)


def multibench_grouping(x: torch.Tensor, n_groups: int) -> list[torch.Tensor]:
    """MultiBench's datasets.stocks.get_data.Grouping.forward on (B, T, n) stacked sorted stocks."""
    x = x.permute(2, 0, 1)
    n = len(x)
    return [torch.stack(list(x[n * i // n_groups : n * (i + 1) // n_groups]), dim=2) for i in range(n_groups)]


# ---------------------------------------------------------------- structure


def test_shapes_and_widths():
    m = model()
    x = stocks()
    step = m.step(x)
    assert list(m.encoders) == ["g0", "g1", "g2"]
    assert all(e.shape == (B, T, 9) for e in step.embeddings.values())  # sequences, not vectors
    assert m.fused_dim == 9 * 3 * 3 and step.fused.shape == (
        B,
        81,
    )  # every group attends to all 3 (MultiBench)
    assert m.head[-1].in_features == 81 and m(x).logits.shape == (B, 1)
    paper = model(attend_self=False, group_members=[["s00", "s01"], ["s02"], ["s03", "s04"]])
    assert paper.fused_dim == 9 * 2 * 3 and paper(x).logits.shape == (
        B,
        1,
    )  # j != i only: 2 streams per target
    assert sorted(paper.cross["g0"]) == ["g1", "g2"] and sorted(m.cross["g0"]) == ["g0", "g1", "g2"]


def test_parameter_count_equals_multibench_mult_on_fnb():
    """MultiBench's MULTModel(3, [4, 4, 5]) with its defaults: crossmodal encoder (d = 9) = 3 layers of
    (attention 4*9*9+4*9, fc 9*36+36+36*9+9, 2 LayerNorms 4*9) + final LayerNorm 2*9; memory the same at
    d = 27; projections 13*9; residual block 2*(81*81+81); output layer 81+1."""

    def encoder(d: int) -> int:
        return 3 * ((4 * d * d + 4 * d) + (d * 4 * d + 4 * d + 4 * d * d + d) + 4 * d) + 2 * d

    expected = 9 * encoder(9) + 3 * encoder(27) + 13 * 9 + 2 * (81 * 81 + 81) + 81 + 1
    assert sum(p.numel() for p in model(13).parameters()) == expected == 125101


def test_groups_follow_multibench_grouping_of_the_sorted_stocks():
    m = model(13)
    assert [len(v) for v in m.members.values()] == [4, 4, 5]  # n*i//G: larger groups last ...
    assert [len(a) for a in np.array_split(np.arange(13), 3)] == [5, 4, 4]  # ... unlike numpy.array_split
    assert split_groups([f"s{i}" for i in range(7)], 3) == [["s0", "s1"], ["s2", "s3"], ["s4", "s5", "s6"]]
    x = stocks(13)
    stacked = torch.cat([x[k] for k in sorted(x)], dim=-1)
    reference = multibench_grouping(stacked, 3)
    shuffled = {k: x[k] for k in reversed(list(x))}  # dict order does not matter, sorted keys do
    ours = m.stack(shuffled)
    assert all(torch.equal(ours[f"g{i}"], reference[i]) for i in range(3))
    assert [m.encoders[g].in_features for g in m.group_names] == [4, 4, 5]
    explicit = model(5, group_members=[["s04", "s00"], ["s01", "s02", "s03"]])
    assert (
        explicit.members == {"g0": ["s00", "s04"], "g1": ["s01", "s02", "s03"]}
        and explicit.fused_dim == 9 * 2 * 2
    )


def test_group_projection_is_bias_free_and_feeds_the_fusion():
    m = model().eval()
    x = stocks()
    groups = m.stack(x)
    emb = m.encode(x)
    for g in m.group_names:
        assert m.encoders[g].proj.bias is None
        assert torch.allclose(emb[g], groups[g] @ m.encoders[g].proj.weight.T)
    assert torch.allclose(m(x).logits, m.head(m.fuse(emb)))


# ---------------------------------------------------------------- attention


def test_positions_are_mults_table_from_position_one():
    """fairseq/MulT: [sin(t w_k) | cos(t w_k) | 0], w_k = 10000^(-k/(half-1)), t = 1..T (0 is its padding
    row)."""
    table = sinusoidal_positions(T, 9, torch.device("cpu"), torch.float32)
    t = torch.arange(1, T + 1, dtype=torch.float32)
    assert table.shape == (T, 9)
    assert torch.allclose(table[:, 0], torch.sin(t)) and torch.allclose(table[:, 4], torch.cos(t))
    assert torch.allclose(table[:, 3], torch.sin(t / 10000.0)) and torch.allclose(
        table[:, 7], torch.cos(t / 10000.0)
    )
    assert torch.equal(table[:, 8], torch.zeros(T))  # odd width: a zero column


def test_crossmodal_block_by_hand():
    """softmax(Q_i K_j^T / sqrt(d_head) + causal mask) V_j per head, pre-LayerNorm, residual, ReLU
    feed-forward."""
    torch.manual_seed(0)
    d, h, dh = 6, 2, 3
    layer = CrossmodalLayer(d, h, attn_dropout=0.0, relu_dropout=0.0, res_dropout=0.0, ff_mult=4).eval()
    x, y = torch.randn(B, 5, d), torch.randn(B, 5, d)
    mask = torch.ones(5, 5, dtype=torch.bool).triu(1)
    wq, wk, wv = layer.attn.in_proj_weight.chunk(3)
    bq, bk, bv = layer.attn.in_proj_bias.chunk(3)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(B, 5, h, dh).transpose(1, 2)

    q = heads(layer.norm_attn(x) @ wq.T + bq)
    k = heads(layer.norm_attn(y) @ wk.T + bk)
    v = heads(layer.norm_attn(y) @ wv.T + bv)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(dh)).masked_fill(mask, float("-inf"))
    att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, 5, d)
    r = x + layer.attn.out_proj(att)
    expected = r + layer.fc2(torch.relu(layer.fc1(layer.norm_ff(r))))
    assert torch.allclose(layer(x, y, y, mask), expected, atol=1e-5)


def test_crossmodal_output_depends_on_the_source_group_causally():
    m = model().eval()
    x = stocks()
    emb = m.encode(x)
    cm = m.cross["g0"]["g1"]  # CM_{g1 -> g0}
    out = cm(emb["g0"], emb["g1"])
    assert torch.equal(out, cm(emb["g0"], emb["g1"]))  # eval: deterministic
    later = emb["g1"].clone()
    later[:, -1] += torch.randn(
        B, 9
    )  # change only the source's last step (a constant shift would be normalised away)
    moved = cm(emb["g0"], later)
    assert torch.allclose(moved[:, :-1], out[:, :-1], atol=1e-6)  # causal: earlier steps cannot see it
    assert not torch.allclose(moved[:, -1], out[:, -1])
    # whole model: changing one stock of group g2 only (s04) changes the prediction;
    # nothing changed: identical
    assert m.members["g2"] == ["s03", "s04"]
    y = dict(x, s04=x["s04"] + 1.0)
    with torch.no_grad():
        assert torch.equal(m(x).logits, m(dict(x)).logits)
        assert not torch.allclose(m(y).logits, m(x).logits)
        # and it reaches target g0 through CM_{g2 -> g0}: g0's own projection is unchanged
        assert torch.equal(m.encode(y)["g0"], emb["g0"])
        assert not torch.allclose(
            m.cross["g0"]["g2"](emb["g0"], m.encode(y)["g2"]), m.cross["g0"]["g2"](emb["g0"], emb["g2"])
        )


def test_gradients_reach_every_parameter():
    m = model().train()
    out = m(stocks())
    nn.functional.mse_loss(out.logits, torch.randn(B, 1)).backward()
    assert [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


# ---------------------------------------------------------------- Pro-Fusion


def test_profusion_wraps_mult_and_w_zero_is_the_base_model():
    torch.manual_seed(0)
    pro = ProFusion({m: LSTMEncoder(1, 4) for m in stocks()}, 1, base="mult", unroll_steps=2, context_dim=3)
    assert isinstance(pro.base, MulTFusion) and sorted(pro.backproject) == ["g0", "g1", "g2"]
    x = stocks()
    out = pro(x)
    assert out.logits.shape == (B, 1)
    nn.functional.mse_loss(out.logits, torch.randn(B, 1)).backward()
    assert [n for n, p in pro.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []
    pro.eval()
    with torch.no_grad():
        # step 2 projects [x_t ; W c_1] at every time step with [P, B]
        base = pro.base
        c1 = base.step(x).fused
        groups = base.stack(x)
        for g in base.group_names:
            enc = base.encoders[g]
            ctx = pro.backproject[g](c1)
            wide = torch.cat([enc.proj.weight, enc.context_join.proj.weight], dim=1)
            joint = torch.cat([groups[g], ctx[:, None, :].expand(B, T, 3)], dim=-1) @ wide.T
            assert torch.allclose(pro.unroll(x)[-1].embeddings[g], joint, atol=1e-5)
        assert not torch.allclose(pro(x).logits, base(x).logits)
        for w in pro.backproject.values():
            w.weight.zero_()
        assert torch.equal(pro(x).logits, base(x).logits)


def test_profusion_own_feedback_is_refused_clearly():
    pro = ProFusion({m: LSTMEncoder(1, 4) for m in stocks()}, 1, base="mult", context_dim=3, feedback="own")
    with pytest.raises(ConfigError, match="feedback=own is not supported"):
        pro(stocks())


# ---------------------------------------------------------------- errors and config


def test_errors_are_clear():
    with pytest.raises(ConfigError, match="fusion.groups=3 groups but there are only 2"):
        model(2)
    with pytest.raises(ConfigError, match="must be >= 2"):
        model(groups=1)
    with pytest.raises(ConfigError, match="divisible by fusion.heads"):
        model(dim=8)
    with pytest.raises(ConfigError, match=r"unknown \['zz'\], repeated \['s00'\], unused \['s04'\]"):
        model(group_members=[["s00", "zz"], ["s00", "s01"], ["s02", "s03"]])
    m = model()
    x = stocks()
    with pytest.raises(ConfigError, match=r"missing \['s04'\]"):
        m({k: v for k, v in x.items() if k != "s04"})
    with pytest.raises(ConfigError, match="equally long"):
        m(dict(x, s04=torch.randn(B, T + 1, 1)))
    with pytest.raises(ConfigError, match=r"'s04' as \(batch, time, 1\)"):
        m(dict(x, s04=torch.randn(B, T, 2)))
    assert m({k: v[..., 0] for k, v in x.items()}).logits.shape == (
        B,
        1,
    )  # (B, T) reads as one feature per step


def test_configs_compose_on_the_fnb_backbone():
    cfg = compose_cfg(["dataset=stocks", "fusion=mult"])
    tickers = instantiate(cfg.dataset, _convert_="all").modalities  # the backbone's `_default_` serves each
    encoders = {k: instantiate(cfg.backbone._default_) for k in tickers}
    m = instantiate(cfg.fusion, encoders=encoders, num_outputs=1, _convert_="all")
    assert m.members == {
        "g0": ["cag", "cpb", "dri", "gis"],
        "g1": ["hrl", "hsy", "k", "mcd"],
        "g2": ["mkc", "sbux", "sjm", "tsn", "yum"],
    }
    assert (m.fused_dim, len(m.cross["g0"]["g1"].layers), len(m.memory["g0"].layers)) == (81, 3, 3)
    pro = compose_cfg(["dataset=stocks", "fusion=profusion", "fusion.base=mult"])
    wrapped = instantiate(pro.fusion, encoders=encoders, num_outputs=1, _convert_="all")
    assert isinstance(wrapped.base, MulTFusion) and sorted(wrapped.encoders) == ["g0", "g1", "g2"]
