"""Every fusion model: shapes, gradients to every parameter, order invariance, hand-computed values."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusionbench.encoders import MLPEncoder
from fusionbench.errors import ConfigError
from fusionbench.fusion import (
    ConcatFusion,
    EarlyFusion,
    LowRankTensorFusion,
    SumFusion,
    TensorFusion,
    UnimodalModel,
    WeightedSumFusion,
)

DIMS = {"audio": 7, "image": 5, "text": 6}
FUSIONS = {
    "concat": (ConcatFusion, {}),
    "early": (EarlyFusion, {"hidden_dims": [8]}),
    "sum": (SumFusion, {}),
    "weighted_sum": (WeightedSumFusion, {"bias": True}),
    "tensor": (TensorFusion, {"head_hidden": [8]}),
    "lowrank": (LowRankTensorFusion, {"rank": 3, "output_dim": 5}),
    "unimodal": (UnimodalModel, {"modality": "image"}),
}


def encoders(width: int = 4, order=DIMS) -> nn.ModuleDict:
    torch.manual_seed(0)
    return nn.ModuleDict({m: MLPEncoder(order[m], [width]) for m in order})


def inputs(batch: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {m: torch.randn(batch, d, generator=g) for m, d in DIMS.items()}


@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_shape_and_gradient_reaches_every_parameter(name):
    cls, kw = FUSIONS[name]
    model = cls(encoders(), num_outputs=4, **kw)
    out = model(inputs())
    assert out.logits.shape == (3, 4)
    assert out.aux_loss is None and out.info == {}
    out.logits.square().sum().backward()
    no_grad = [
        n
        for n, p in model.named_parameters()
        if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0
    ]
    assert no_grad == [], f"{name}: parameters without gradient: {no_grad}"


@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_dict_order_does_not_matter(name):
    cls, kw = FUSIONS[name]
    model = cls(encoders(), num_outputs=2, **kw).eval()
    x = inputs()
    reversed_x = {m: x[m] for m in reversed(list(x))}
    assert torch.equal(model(x).logits, model(reversed_x).logits)


@pytest.mark.parametrize("name", sorted(set(FUSIONS) - {"unimodal"}))
def test_missing_modality_is_a_clear_error(name):
    cls, kw = FUSIONS[name]
    model = cls(encoders(), num_outputs=2, **kw)
    x = inputs()
    del x["text"]
    with pytest.raises(ConfigError, match="text"):
        model(x)


def test_lowrank_factors_are_registered_and_trained():
    """The MultiBench bug: factors kept in a Python list are invisible to the optimizer."""
    model = LowRankTensorFusion(encoders(), num_outputs=2, rank=2, output_dim=3)
    names = {n for n, _ in model.named_parameters()}
    assert {"factors.audio", "factors.image", "factors.text", "rank_weights", "bias"} <= names
    before = model.factors["text"].detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(inputs()).logits.sum().backward()
    opt.step()
    assert not torch.equal(before, model.factors["text"])


def test_lowrank_equals_tensor_fusion_with_the_reconstructed_weight():
    """h = sum_r lambda_r prod_i([z_i;1] W_i^r) + b  ==  vec(outer product) @ W_full + b."""
    enc = nn.ModuleDict({"a": nn.Identity(), "b": nn.Identity()})
    enc["a"].output_dim, enc["b"].output_dim = 2, 3
    lmf = LowRankTensorFusion(enc, num_outputs=1, rank=2, output_dim=4)
    tfn = TensorFusion(enc, num_outputs=1)
    z = {"a": torch.randn(5, 2), "b": torch.randn(5, 3)}
    wa, wb, lam = lmf.factors["a"], lmf.factors["b"], lmf.rank_weights[0]
    full = torch.einsum("r,rio,rjo->ijo", lam, wa, wb).reshape(3 * 4, 4)  # (3*4) x d_out
    expected = tfn.fuse(z) @ full + lmf.bias
    assert torch.allclose(lmf.fuse(z), expected, atol=1e-5)


def test_tensor_fusion_is_the_outer_product_with_ones():
    enc = nn.ModuleDict({"a": nn.Identity(), "b": nn.Identity()})
    enc["a"].output_dim, enc["b"].output_dim = 1, 2
    model = TensorFusion(enc, num_outputs=2)
    assert model.fused_dim == 2 * 3
    fused = model.fuse({"a": torch.tensor([[2.0]]), "b": torch.tensor([[3.0, 5.0]])})
    # [2, 1] (x) [3, 5, 1] = [6, 10, 2, 3, 5, 1]
    assert fused.tolist() == [[6.0, 10.0, 2.0, 3.0, 5.0, 1.0]]


def test_tensor_fusion_refuses_huge_products():
    enc = nn.ModuleDict({m: MLPEncoder(3, [200]) for m in "abc"})
    with pytest.raises(ConfigError, match="lowrank"):
        TensorFusion(enc, num_outputs=2)


def test_weighted_sum_matches_hand_computation():
    enc = nn.ModuleDict({"a": nn.Identity(), "b": nn.Identity()})
    enc["a"].output_dim = enc["b"].output_dim = 2
    model = WeightedSumFusion(enc, num_outputs=2)
    assert model.weights.tolist() == [1.0, 1.0]  # eq. 12 initialised as a plain sum
    with torch.no_grad():
        model.weights.copy_(torch.tensor([2.0, -3.0]))
    fused = model.fuse({"a": torch.tensor([[1.0, 2.0]]), "b": torch.tensor([[4.0, 1.0]])})
    assert fused.tolist() == [[2 - 12.0, 4 - 3.0]]


def test_sum_needs_equal_widths():
    enc = nn.ModuleDict({"a": MLPEncoder(3, [4]), "b": MLPEncoder(3, [5])})
    with pytest.raises(
        ConfigError, match=r"same width, got `backbone.a.hidden_dims`=4, `backbone.b.hidden_dims`=5"
    ):
        SumFusion(enc, num_outputs=2)
    with pytest.raises(ConfigError, match="same width"):
        WeightedSumFusion(enc, num_outputs=2)


def test_unimodal_keeps_only_its_encoder():
    model = UnimodalModel(encoders(), num_outputs=2, modality="text")
    assert list(model.encoders) == ["text"]
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == (6 * 4 + 4) + (4 * 2 + 2)
    with pytest.raises(ConfigError, match="set `fusion.modality`"):
        UnimodalModel(encoders(), num_outputs=2)
    single = nn.ModuleDict({"text": MLPEncoder(6, [4])})
    assert UnimodalModel(single, num_outputs=2).modality == "text"


def test_early_fusion_is_one_network_on_concatenated_inputs():
    model = EarlyFusion(encoders(), num_outputs=2, hidden_dims=[8])
    assert list(model.encoders) == ["joint"]
    assert sum(p.numel() for p in model.parameters()) == (18 * 8 + 8) + (8 * 2 + 2)
    x = inputs()
    joint = torch.cat([x["audio"], x["image"], x["text"]], dim=1)  # sorted modality order
    assert torch.allclose(model(x).logits, model.head(model.encoders["joint"](joint)))


def test_concat_head_sees_sorted_concatenation():
    model = ConcatFusion(encoders(), num_outputs=2)
    z = {m: torch.full((1, 4), float(i)) for i, m in enumerate(["text", "audio", "image"])}
    assert model.fuse(z)[0].tolist() == [1.0] * 4 + [2.0] * 4 + [0.0] * 4
