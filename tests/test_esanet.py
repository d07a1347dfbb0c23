"""ESANet and fusion-level DynMM: shapes, fusion points, costs, routing that really skips the depth encoder,
the resource loss, the schedule, stage I and loading a trained ESANet, and ImageNet weights for the trunks."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

from fusionbench.encoders import ResNetTrunk
from fusionbench.errors import ConfigError
from fusionbench.fusion import ESANetFusion, FusionLevelDynMM
from fusionbench.fusion.esanet import LearnedUpsample, SEFusionAdd

SMALL = {"decoder_channels": (32, 16, 16), "decoder_blocks": (1, 1, 1)}


def trunks(widths=(16, 32, 64, 128)) -> dict[str, ResNetTrunk]:
    return {"rgb": ResNetTrunk("small", 3, widths=widths), "depth": ResNetTrunk("small", 1, widths=widths)}


def batch(b: int = 3, size: int = 96) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "rgb": torch.randn(b, 3, size, size, generator=g),
        "depth": torch.randn(b, 1, size, size, generator=g),
    }


def test_trunk_stages_and_widths():
    t = ResNetTrunk("resnet50", 1)
    assert t.channels == [64, 256, 512, 1024, 2048] and t.conv1.in_channels == 1
    x = t.forward_stem(torch.randn(1, 1, 64, 64))
    assert x.shape == (1, 64, 32, 32)  # stride 2, no max-pool (ESANet fuses before pooling)
    assert t(torch.randn(1, 1, 64, 64)).shape == (1, 2048, 2, 2)
    assert ResNetTrunk("resnet34").channels == [64, 64, 128, 256, 512]


def test_imagenet_weights_load_and_depth_conv1_sums_rgb_filters(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    rgb, depth = ResNetTrunk("resnet18", 3, weights=str(path)), ResNetTrunk("resnet18", 1, weights=str(path))
    assert torch.equal(rgb.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    assert torch.allclose(depth.conv1.weight, reference.conv1.weight.sum(dim=1, keepdim=True))
    with pytest.raises(ConfigError, match="do not exist"):
        ResNetTrunk("resnet18", 3, weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match="not a torchvision resnet34"):
        ResNetTrunk("resnet34", 3, weights=str(path))


def test_learned_upsample_starts_as_smooth_nearest_upsampling():
    up = LearnedUpsample(2)
    x = torch.ones(1, 2, 4, 4)
    with torch.no_grad():
        y = up(x)
    assert y.shape == (1, 2, 8, 8)
    assert torch.allclose(y[..., 1:-1, 1:-1], torch.ones(1, 2, 6, 6))  # the kernel sums to 1
    assert math.isclose(float(y[0, 0, 0, 0]), 0.25 + 2 * 0.125 + 0.0625)  # zero padding at the corner


def test_se_fusion_adds_channel_reweighted_streams():
    se = SEFusionAdd(32)
    rgb, depth = torch.randn(2, 32, 5, 5), torch.randn(2, 32, 5, 5)
    w_rgb = se.se_rgb.fc(rgb.mean(dim=(2, 3), keepdim=True))
    w_depth = se.se_depth.fc(depth.mean(dim=(2, 3), keepdim=True))
    assert torch.allclose(se(rgb, depth), rgb * w_rgb + depth * w_depth, atol=1e-6)
    assert se.se_rgb.fc[0].out_channels == 2  # reduction 16


def test_esanet_output_side_outputs_and_costs():
    model = ESANetFusion(trunks(), 5, **SMALL)
    model.train()
    out = model(batch())
    assert out.logits.shape == (3, 5, 96, 96)
    assert [tuple(s.shape[-2:]) for s in out.extras["side_logits"]] == [
        (12, 12),
        (6, 6),
        (3, 3),
    ]  # /8 /16 /32
    costs = model.branch_madds.tolist()
    assert costs == sorted(costs) and costs[0] < costs[4]  # more fused stages cost more
    assert math.isclose(float(out.info["cost/gmacs"]), costs[4] / 1e9, rel_tol=1e-6)
    assert math.isclose(float(out.info["cost/depth_gmacs"]), (costs[4] - costs[0]) / 1e9, rel_tol=1e-5)
    model.eval()
    assert model(batch()).extras is None  # no side outputs at inference
    out.logits.sum().backward()
    assert model.encoders["depth"].layer4[0].conv1.weight.grad is not None  # depth is fused at stage 4


def test_esanet_rgb_only_and_errors():
    rgb_only = ESANetFusion({"rgb": ResNetTrunk("small", 3)}, 4, **SMALL)
    assert rgb_only.fusions is None and rgb_only({"rgb": batch()["rgb"]}).logits.shape == (3, 4, 96, 96)
    with pytest.raises(ConfigError, match="multiple of 32"):
        ESANetFusion(trunks(), 4, **SMALL)(
            {"rgb": torch.randn(1, 3, 80, 96), "depth": torch.randn(1, 1, 80, 96)}
        )
    with pytest.raises(ConfigError, match="equal widths"):
        ESANetFusion(
            {"rgb": ResNetTrunk("small", 3), "depth": ResNetTrunk("small", 1, widths=(8, 16, 32, 64))}, 4
        )
    with pytest.raises(ConfigError, match="needs an `rgb` encoder"):
        ESANetFusion({"depth": ResNetTrunk("small", 1)}, 4)


def force_branches(model: FusionLevelDynMM, branches: list[int]) -> None:
    """The gate's decisions replaced by fixed per-image branches (one-hot)."""
    fixed = torch.nn.functional.one_hot(torch.tensor(branches), 5).float()
    model.decisions = lambda rgb, depth: fixed.to(rgb)  # type: ignore[method-assign]


def count_depth_stages(model: FusionLevelDynMM) -> list[int]:
    """Images seen by each depth stage (forward hooks)."""
    seen = [0, 0, 0, 0]
    for i, stage in enumerate(model.encoders["depth"].stages):
        stage.register_forward_hook(lambda mod, inp, out, i=i: seen.__setitem__(i, seen[i] + inp[0].shape[0]))
    return seen


def test_routed_inference_equals_the_mixture_and_stops_the_depth_encoder():
    torch.manual_seed(0)
    model = FusionLevelDynMM(trunks(), 5, cost="relative", **SMALL)
    x = batch(5)
    model.eval()
    with torch.no_grad():
        model(x)  # costs measured
        force_branches(model, [0, 2, 4, 1, 2])
        seen = count_depth_stages(model)
        routed = model(x)
        assert seen == [4, 3, 1, 1]  # stage i runs only for images with k > i (k = 0, 2, 4, 1, 2)
        model.route = False
        mixture = model(x)
    assert torch.allclose(routed.logits, mixture.logits, atol=1e-5)
    assert math.isclose(float(routed.info["dynmm/share_k2"]), 0.4, rel_tol=1e-6)
    assert math.isclose(float(routed.info["dynmm/depth_stages"]), (0 + 2 + 4 + 1 + 2) / 5, rel_tol=1e-6)
    expected = sum(model.branch_madds[k].item() for k in [0, 2, 4, 1, 2]) / 5 / 1e9
    assert math.isclose(float(routed.info["cost/gmacs"]), expected, rel_tol=1e-5)


def test_branch_4_is_static_esanet_with_the_same_weights():
    torch.manual_seed(1)
    dyn = FusionLevelDynMM(trunks(), 5, **SMALL)
    static = ESANetFusion(trunks(), 5, **SMALL)
    static.load_state_dict({k: v for k, v in dyn.state_dict().items() if k in static.state_dict()})
    dyn.eval(), static.eval()
    with torch.no_grad():
        dyn(batch(1))  # costs measured (batch 1, every branch) before the decisions are fixed
    force_branches(dyn, [4, 4])
    with torch.no_grad():
        assert torch.allclose(dyn(batch(2)).logits, static(batch(2)).logits, atol=1e-5)


def test_resource_loss_is_the_public_form():
    model = FusionLevelDynMM(
        trunks(), 5, cost=[0.0, 1.0, 2.0, 3.0, 4.0], resource_weight=0.5, budget=0.1, **SMALL
    )
    model.eval()
    with torch.no_grad():
        model(batch(1))  # costs measured before the decisions are fixed
    model.train()
    g = torch.tensor([[0.5, 0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
    model.decisions = lambda rgb, depth: g  # type: ignore[method-assign]
    out = model(batch(2))
    resource = ((g.mean(0)) * torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])).mean()  # (1/5) Σ_k mean_b(g_k) C_k
    assert math.isclose(float(out.info["dynmm/resource"]), float(resource), rel_tol=1e-6)
    assert math.isclose(float(out.aux_loss), 0.5 * (float(resource) - 0.1), rel_tol=1e-6)


def test_gate_gets_gradients_from_task_and_resource_loss_in_stage_two():
    model = FusionLevelDynMM(trunks(), 5, cost="relative", resource_weight=1.0, **SMALL)
    model.train()
    out = model(batch(2))
    (out.logits.mean() + out.aux_loss).backward()
    assert model.gate.fc.weight.grad is not None and model.gate.fc.weight.grad.abs().sum() > 0


def test_costs_relative_and_gmacs():
    model = FusionLevelDynMM(trunks(), 5, cost="relative", **SMALL)
    model.eval()
    with torch.no_grad():
        model(batch(1))
    c = model.costs()
    assert c[0] == 0 and math.isclose(float(c[4]), 1.0) and bool((c[1:] > c[:-1]).all())
    model.cost_form = "gmacs"
    extra = (model.branch_madds[4] - model.branch_madds[0]).item() / 1e9
    assert math.isclose(float(model.costs()[4]), extra, rel_tol=1e-6)


def test_schedule_stage_one_and_temperature():
    model = FusionLevelDynMM(
        trunks(),
        5,
        stage1_epochs=2,
        stage1_routing="static",
        hard_epoch=3,
        temperature={"start": 1.0, "end": 0.01, "anneal_epochs": 2},
        **SMALL,
    )
    model.set_epoch(0)
    assert int(model.stage) == 1 and math.isclose(float(model.temperature), 1.0)
    rgb, depth = model.stems(batch(4))
    assert model.decisions(rgb, depth).argmax(-1).tolist() == [4, 4, 4, 4]  # static branch in stage I
    model.set_epoch(3)  # stage II epoch 1
    assert int(model.stage) == 2 and math.isclose(float(model.temperature), 0.1, rel_tol=1e-6)
    assert not bool(model.hard)
    model.set_epoch(5)  # stage II epoch 3: hard decisions
    assert bool(model.hard) and math.isclose(float(model.temperature), 0.01, rel_tol=1e-6)
    model.train()
    g = model.decisions(rgb, depth)
    assert torch.equal(g.detach().sum(-1), torch.ones(4)) and set(g.detach().flatten().tolist()) <= {0.0, 1.0}
    model.stage1_routing = "random"
    model.set_epoch(0)
    torch.manual_seed(0)
    assert len(set(model.decisions(*model.stems(batch(40))).argmax(-1).tolist())) == 5


def test_stage_two_starts_from_a_trained_esanet_checkpoint(tmp_path):
    static = ESANetFusion(trunks(), 5, **SMALL)
    path = tmp_path / "esanet.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in static.state_dict().items()}}, path)
    model = FusionLevelDynMM(trunks(), 5, stage1_ckpt=str(tmp_path / "esa*.ckpt"), stage1_epochs=3, **SMALL)
    assert model.stage1_loaded and int(model.stage) == 2 and model.stage_at(0) == 2
    assert torch.equal(
        model.encoders["depth"].layer2[0].conv1.weight, static.encoders["depth"].layer2[0].conv1.weight
    )
    other = ESANetFusion(trunks(widths=(8, 16, 32, 64)), 5, **SMALL)
    torch.save({"state_dict": {f"model.{k}": v for k, v in other.state_dict().items()}}, path)
    with pytest.raises(ConfigError, match="not an ESANet of this backbone"):
        FusionLevelDynMM(trunks(), 5, stage1_ckpt=str(path), **SMALL)


def test_gate_needs_large_enough_images_and_config_errors():
    model = FusionLevelDynMM(trunks(), 5, **SMALL)
    with pytest.raises(ConfigError, match="at least 17 pixels"):
        model(batch(1, size=64))
    with pytest.raises(ConfigError, match="resource_weight"):
        FusionLevelDynMM(trunks(), 5, resource_weight=-1.0, **SMALL)
    with pytest.raises(ConfigError, match="cost"):
        FusionLevelDynMM(trunks(), 5, cost=[1.0, 2.0], **SMALL)
    with pytest.raises(ConfigError, match="depth"):
        FusionLevelDynMM({"rgb": ResNetTrunk("small", 3)}, 5, **SMALL)


def test_time_routing_reports_every_branch():
    model = FusionLevelDynMM(trunks(), 5, **SMALL)
    timing = model.time_routing(batch(4), batch_sizes=[2], repeats=1)
    row = timing["ms_per_sample"]["2"]
    assert {"routed", "mixture_full_depth", "branch_0", "branch_4", "speedup_vs_static"} <= set(row)
    assert math.isclose(sum(timing["shares"].values()), 1.0) and len(timing["branch_gmacs"]) == 5
    assert model.forced_branch is None and model.route and model.training
