"""MI-Matrix fusion (MultiBench MultiplicativeInteractions2Modal 'matrix'): a hand-computed tiny case, shapes,
gradients to every parameter, config errors, the Hydra config, and Pro-Fusion around it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusionbench.encoders import IdentityEncoder, MLPEncoder
from fusionbench.errors import ConfigError
from fusionbench.fusion import MIMatrixFusion, ProFusion
from fusionbench.fusion.profusion import build_base


def identity(dims: dict[str, int]) -> nn.ModuleDict:
    return nn.ModuleDict({m: IdentityEncoder(d) for m, d in dims.items()})


def test_fuse_matches_a_hand_computation() -> None:
    model = MIMatrixFusion(identity({"image": 1, "text": 2}), num_outputs=1, output_dim=1, first="text")
    with torch.no_grad():
        model.W.copy_(torch.tensor([[[2.0]], [[3.0]]]))  # W[n, m, d], n over text (x), m over image (y)
        model.U.copy_(torch.tensor([[1.0], [-1.0]]))
        model.V.copy_(torch.tensor([[0.5]]))
        model.b.fill_(0.25)
    x, y = torch.tensor([[1.0, 2.0]]), torch.tensor([[4.0]])
    # y W'(x) + b'(x) = 4 (1*2 + 2*3 + 0.5) + (1*1 + 2*(-1) + 0.25) = 34 - 0.75
    h = model.fuse({"text": x, "image": y})
    assert torch.allclose(h, torch.tensor([[33.25]]))


def test_fuse_equals_the_hypernetwork_form_and_first_picks_x() -> None:
    torch.manual_seed(0)
    model = MIMatrixFusion(identity({"image": 3, "text": 5}), num_outputs=2, output_dim=4, first="text")
    assert (model.first, model.second) == ("text", "image")
    assert model.W.shape == (5, 3, 4) and model.U.shape == (5, 4) and model.V.shape == (3, 4)
    x, y = torch.randn(6, 5), torch.randn(6, 3)
    hyper = torch.einsum("bm,bmd->bd", y, torch.einsum("bn,nmd->bmd", x, model.W) + model.V)
    expected = hyper + x @ model.U + model.b
    assert torch.allclose(model.fuse({"text": x, "image": y}), expected, atol=1e-5)
    default = MIMatrixFusion(identity({"image": 3, "text": 5}), num_outputs=2, output_dim=4)
    assert default.first == "image" and default.W.shape == (3, 5, 4)


def test_shapes_and_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    encoders = nn.ModuleDict({"image": MLPEncoder(12, [8]), "text": MLPEncoder(6, [4])})
    model = MIMatrixFusion(encoders, num_outputs=3, output_dim=10, first="text")
    assert model.fused_dim == 10 and model.head[-1].in_features == 10
    out = model({"image": torch.randn(5, 12), "text": torch.randn(5, 6)})
    assert out.logits.shape == (5, 3) and out.aux_loss is None
    F.binary_cross_entropy_with_logits(out.logits, torch.rand(5, 3)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_config_errors_say_what_to_change() -> None:
    with pytest.raises(ConfigError, match="exactly two modalities"):
        MIMatrixFusion(identity({"a": 2, "b": 2, "c": 2}), num_outputs=1)
    with pytest.raises(
        ConfigError, match=r"fusion.first='audio' is not one of the modalities \['image', 'text'\]"
    ):
        MIMatrixFusion(identity({"image": 2, "text": 2}), num_outputs=1, first="audio")


def test_hydra_config_builds_multibench_mmimdb_sizes() -> None:
    model = build_base("mi_matrix", identity({"image": 8, "text": 4}), 23, {"first": "text"})
    assert isinstance(model, MIMatrixFusion)
    assert model.fused_dim == 1024 and model.W.shape == (4, 8, 1024)
    assert (
        isinstance(model.head[-1], nn.Linear) and model.head[-1].out_features == 23 and len(model.head) == 1
    )


def test_profusion_with_zero_backprojection_is_the_base() -> None:
    torch.manual_seed(0)
    encoders = nn.ModuleDict({"image": MLPEncoder(12, [8]), "text": MLPEncoder(6, [4])})
    pro = ProFusion(
        encoders, 3, base="mi_matrix", base_args={"output_dim": 6, "first": "text"}, unroll_steps=2
    )
    assert isinstance(pro.base, MIMatrixFusion)
    x = {"image": torch.randn(4, 12), "text": torch.randn(4, 6)}
    F.binary_cross_entropy_with_logits(pro(x).logits, torch.rand(4, 3)).backward()
    assert all(w.weight.grad is not None and w.weight.grad.abs().sum() > 0 for w in pro.backproject.values())
    pro.eval()
    with torch.no_grad():
        assert not torch.allclose(pro(x).logits, pro.base(x).logits)
        for w in pro.backproject.values():
            nn.init.zeros_(w.weight)
        assert torch.equal(pro(x).logits, pro.base(x).logits)
