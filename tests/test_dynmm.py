"""Modality-level DynMM: straight-through decisions, hard routing that runs only the selected expert,
soft mixtures, the resource loss in both cost forms, temperature annealing, two-stage training with
freezing, stage-I checkpoints, and the errors that explain bad configs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from dynmm_common import EXPERTS, batch, bias_gate, model
from torch import nn

from fusionbench.compute import count_madds
from fusionbench.encoders import MLPEncoder
from fusionbench.errors import ConfigError
from fusionbench.fusion import DynMMFusion, FusionOutput
from fusionbench.fusion.dynmm import (
    ConvGate,
    MLPGate,
    anneal_temperature,
    gumbel_softmax_st,
    resource_loss,
    softmax_st,
)


# -- decisions --------------------------------------------------------------------------------------------
def test_gumbel_straight_through_is_one_hot_forward_and_soft_backward():
    torch.manual_seed(0)
    logits = torch.randn(6, 3, requires_grad=True)
    noise = -torch.empty(6, 3).exponential_().log()
    weights = torch.randn(6, 3)
    tau = 0.7
    hard, soft = gumbel_softmax_st(logits, tau, noise)
    # forward: exactly one-hot at the argmax of (logits + noise)
    assert torch.equal(hard.detach(), F.one_hot((logits + noise).argmax(-1), 3).float())
    assert torch.allclose(soft, F.softmax((logits.detach() + noise) / tau, dim=-1))
    (g_hard,) = torch.autograd.grad((weights * hard).sum(), logits)
    soft_only = F.softmax((logits + noise) / tau, dim=-1)
    (g_soft,) = torch.autograd.grad((weights * soft_only).sum(), logits)
    assert torch.allclose(g_hard, g_soft) and g_hard.abs().sum() > 0
    # drawn noise: still one-hot per row
    hard2, _ = gumbel_softmax_st(logits, 1.0)
    assert torch.equal(hard2.detach().sum(-1), torch.ones(6)) and set(hard2.detach().unique().tolist()) <= {
        0.0,
        1.0,
    }


def test_softmax_gating_is_deterministic_and_gumbel_is_not():
    logits = torch.randn(64, 4)
    a, sa = softmax_st(logits, 0.5)
    b, sb = softmax_st(logits, 0.5)
    assert torch.equal(a, b) and torch.equal(sa, sb)
    assert torch.equal(a, F.one_hot(logits.argmax(-1), 4).float())
    m = model(gating="softmax").train()
    bias_gate(m)
    x = batch(64)
    assert torch.equal(m(x).logits, m(x).logits)
    g = model(gating="gumbel").train()
    bias_gate(g)
    draws = {tuple(g(x).info[f"dynmm/share_{n}"].item() for n in ("uni", "late")) for _ in range(5)}
    assert len(draws) > 1  # the noise changes decisions from draw to draw


def test_hard_routing_runs_each_expert_only_on_its_samples():
    m = model(gating="gumbel").eval()
    bias_gate(m)
    x = batch(32)
    with torch.no_grad():
        m(x)  # the first batch also measures the experts' MAdds on its first sample
    seen: dict[str, list[torch.Tensor]] = {"uni": [], "late": []}
    hooks = [
        m.experts[n].register_forward_hook(lambda mod, args, out, n=n: seen[n].append(args[0])) for n in seen
    ]
    with torch.no_grad():
        out = m(x)
        choice = m.gate(x).argmax(-1)
    for h in hooks:
        h.remove()
    assert 0 < int((choice == 0).sum()) < 32  # both experts have samples
    for i, name in enumerate(("uni", "late")):
        rows = (choice == i).nonzero(as_tuple=True)[0]
        assert len(seen[name]) == 1  # one call per expert, on its own samples only
        inputs = seen[name][0]
        assert sorted(inputs) == m.expert_modalities[name]
        assert all(v.shape[0] == len(rows) for v in inputs.values())
        assert torch.equal(inputs["a"], x["a"][rows])
        with torch.no_grad():
            alone = m.experts[name]({k: x[k][rows] for k in m.expert_modalities[name]}).logits
        assert torch.allclose(out.logits[rows], alone)
    shares = [out.info["dynmm/share_uni"].item(), out.info["dynmm/share_late"].item()]
    assert shares == pytest.approx([(choice == 0).float().mean().item(), (choice == 1).float().mean().item()])
    assert sum(shares) == pytest.approx(1.0)


def test_training_with_hard_gating_equals_the_selected_expert():
    m = model(gating="softmax").train()
    bias_gate(m)
    x = batch(32)
    out = m(x)
    choice = m.gate(x).argmax(-1)
    experts = torch.stack(
        [m.experts[n]({k: x[k] for k in m.expert_modalities[n]}).logits for n in ("uni", "late")], 1
    )
    assert torch.allclose(out.logits, experts[torch.arange(32), choice])


def test_soft_gating_is_the_hand_computed_mixture():
    m = model(gating="soft", temperature=0.5)
    bias_gate(m)
    x = batch(8)
    for mode in (True, False):
        m.train(mode)
        out = m(x)
        w = F.softmax(m.gate(x) / 0.5, dim=-1)
        e = [m.experts[n]({k: x[k] for k in m.expert_modalities[n]}).logits for n in ("uni", "late")]
        assert torch.allclose(out.logits, w[:, :1] * e[0] + w[:, 1:] * e[1], atol=1e-6)
        assert out.info["dynmm/share_uni"] + out.info["dynmm/share_late"] == pytest.approx(1.0)
        assert out.info["dynmm/share_uni"] == pytest.approx(w[:, 0].mean().item())
        # soft gating runs every expert: its cost per sample is all of them plus the gate
        assert out.info["dynmm/madds"].item() == pytest.approx(float(m.expert_madds.sum() + m.gate_madds))


# -- resource loss ----------------------------------------------------------------------------------------
def test_resource_loss_by_hand_for_both_cost_forms():
    g = torch.tensor([[0.2, 0.8], [0.9, 0.1], [0.5, 0.5]])
    # madds: the costs normalised by the largest expert's
    m = model(cost="madds")
    m.expert_madds.copy_(torch.tensor([250, 1000]))
    m.costs_measured.fill_(True)
    assert torch.allclose(m.costs(), torch.tensor([0.25, 1.0]))
    expected = ((0.2 * 0.25 + 0.8) + (0.9 * 0.25 + 0.1) + (0.5 * 0.25 + 0.5)) / 3
    assert resource_loss(g, m.costs()).item() == pytest.approx(expected)
    # share: the public code's batch mean of the last expert's gate weight
    s = model(cost="share")
    assert torch.equal(s.costs(), torch.tensor([0.0, 1.0]))
    assert resource_loss(g, s.costs()).item() == pytest.approx((0.8 + 0.1 + 0.5) / 3)
    # fixed costs as given
    f = model(cost={"uni": 1.25, "late": 10.87})
    assert resource_loss(g, f.costs()).item() == pytest.approx(
        (0.2 * 1.25 + 0.8 * 10.87 + 0.9 * 1.25 + 0.1 * 10.87 + 0.5 * 1.25 + 0.5 * 10.87) / 3
    )


@pytest.mark.parametrize("cost", ["madds", "share"])
def test_aux_loss_is_lambda_times_the_expected_cost_of_the_decisions(cost):
    m = model(cost=cost, resource_weight=0.3).eval()
    bias_gate(m)
    x = batch(32)
    with torch.no_grad():
        out = m(x)
        choice = m.gate(x).argmax(-1)
    c = m.costs()
    assert out.aux_loss.item() == pytest.approx(0.3 * c[choice].mean().item(), rel=1e-6)
    assert out.info["dynmm/resource"].item() == pytest.approx(c[choice].mean().item(), rel=1e-6)


@pytest.mark.parametrize(("lam", "expected"), [(0.0, "late"), (5.0, "uni")])
def test_training_the_gate_trades_the_task_loss_against_the_cost(lam, expected):
    """Targets are the late expert's own predictions (it is always right, the one-view expert often wrong) and
    the one-view expert costs a tenth: without the resource loss the gate learns to send every sample to late
    fusion, with a large λ to the cheap expert (experts fixed, the gate alone trained, deterministic softmax
    decisions)."""
    m = model(cost={"uni": 0.1, "late": 1.0}, resource_weight=lam, gating="softmax").train()
    x = batch(64)
    with torch.no_grad():
        m.gate(x)  # materialise the lazy layers
        y = m.experts["late"](m.expert_inputs(x, "late")).logits.argmax(-1)
    for p in m.experts.parameters():
        p.requires_grad_(False)
    m.experts.eval()
    opt = torch.optim.Adam(m.gate.parameters(), lr=0.05)
    for _ in range(150):
        out = m(x)
        loss = F.cross_entropy(out.logits, y) + out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    share = m.eval()(x).info[f"dynmm/share_{expected}"].item()
    assert share >= 0.95, f"λ={lam}: share of {expected} {share:.2f}"


def test_madds_are_measured_on_the_first_sample_and_kept_in_checkpoints():
    m = model()
    x = batch(8)
    assert not bool(m.costs_measured)
    m.train()(x)
    first = {k: v[:1] for k, v in x.items()}
    uni = count_madds(m.experts["uni"], {"a": first["a"]}).madds
    late = count_madds(m.experts["late"], first).madds
    assert m.expert_madds.tolist() == [uni, late] and late > uni > 0
    assert int(m.gate_madds) == count_madds(m.gate, first).madds > 0
    state = m.state_dict()
    assert {"expert_madds", "gate_madds", "costs_measured", "stage", "temperature"} <= set(state)
    fresh = model()
    fresh.gate(x)  # lazy layers take their shapes before loading
    fresh.load_state_dict(state)
    assert bool(fresh.costs_measured) and fresh.expert_madds.tolist() == [uni, late]
    # expected MAdds per sample with hard routing: Σ share_i C_i + the gate's
    out = m.eval()(x)
    share = torch.tensor([out.info["dynmm/share_uni"], out.info["dynmm/share_late"]])
    assert out.info["dynmm/madds"].item() == pytest.approx(
        share[0].item() * uni + share[1].item() * late + int(m.gate_madds)
    )
    assert out.info["dynmm/gate_madds"] == int(m.gate_madds)


# -- temperature ------------------------------------------------------------------------------------------
def test_temperature_annealing_by_hand():
    assert anneal_temperature(0, 1.0, 0.01, 4, "exp") == pytest.approx(1.0)
    assert anneal_temperature(2, 1.0, 0.01, 4, "exp") == pytest.approx(0.1)  # 1 * 0.01^(2/4)
    assert anneal_temperature(4, 1.0, 0.01, 4, "exp") == pytest.approx(0.01)
    assert anneal_temperature(9, 1.0, 0.01, 4, "exp") == pytest.approx(0.01)  # held at the end
    assert anneal_temperature(1, 1.0, 0.2, 4, "linear") == pytest.approx(0.8)
    assert anneal_temperature(3, 2.0, 0.5, 0, "exp") == pytest.approx(2.0)  # no annealing
    m = model(stage1_epochs=3, temperature={"start": 1.0, "end": 0.1, "anneal_epochs": 2, "schedule": "exp"})
    expected = {
        0: 1.0,
        2: 1.0,
        3: 1.0,
        4: math.sqrt(0.1),
        5: 0.1,
        8: 0.1,
    }  # counted from the first stage-II epoch
    for epoch, tau in expected.items():
        m.set_epoch(epoch)
        assert float(m.temperature) == pytest.approx(tau, rel=1e-6)
        assert int(m.stage) == (1 if epoch < 3 else 2)
        assert m(batch(4)).info["dynmm/temperature"] == pytest.approx(tau, rel=1e-6)


# -- errors -----------------------------------------------------------------------------------------------
class WideExpert(nn.Module):
    """A fusion model that predicts one output more than asked."""

    def __init__(self, encoders, num_outputs: int, report: bool = True) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        if report:
            self.num_outputs = num_outputs + 1
        self.head = nn.Linear(sum(e.output_dim for e in encoders.values()), num_outputs + 1)

    def forward(self, inputs) -> FusionOutput:
        z = torch.cat([self.encoders[m](inputs[m]) for m in sorted(self.encoders)], dim=-1)
        return FusionOutput(self.head(z), None, {})


def test_config_errors_are_explained():
    with pytest.raises(ConfigError, match=r"resource_weight .* must be >= 0, got -0.1"):
        model(resource_weight=-0.1)
    gate = {"_target_": "fusionbench.fusion.dynmm.MLPGate", "num_outputs": 3}
    with pytest.raises(ConfigError, match=r"gate outputs 3 logits but there are 2 experts \['uni', 'late'\]"):
        model(gate=gate)
    assert isinstance(
        model(gate={"_target_": "fusionbench.fusion.dynmm.MLPGate", "num_outputs": 2}).gate, MLPGate
    )
    wide = {
        "uni": {"fusion": "unimodal", "modalities": ["a"]},
        "wide": {"fusion": WideExpert, "modalities": "all"},
    }
    with pytest.raises(ConfigError, match=r"expert 'uni' has 3 outputs and expert 'wide' has 4"):
        model(experts=wide)
    quiet = {
        "uni": {"fusion": "unimodal", "modalities": ["a"]},
        "wide": {
            "fusion": lambda encoders, num_outputs: WideExpert(encoders, num_outputs, report=False),
            "modalities": "all",
        },
    }
    with pytest.raises(
        ConfigError, match=r"expert 'uni' gives \(3,\) per sample and expert 'wide' gives \(4,\)"
    ):
        model(experts=quiet)(batch(4))
    with pytest.raises(ConfigError, match=r"at least two experts"):
        model(experts={"uni": EXPERTS["uni"]})
    with pytest.raises(ConfigError, match=r"'c' is not among the modalities \['a', 'b'\]"):
        model(experts={**EXPERTS, "x": {"fusion": "concat", "modalities": ["c"]}})
    with pytest.raises(ConfigError, match=r"position 2 is out of range"):
        model(experts={**EXPERTS, "x": {"fusion": "unimodal", "modalities": [2]}})
    with pytest.raises(ConfigError, match=r"fusion.experts.x.fusion='nope' is not a fusion"):
        model(experts={**EXPERTS, "x": {"fusion": "nope"}})
    with pytest.raises(ConfigError, match=r"fusion.gating must be one of"):
        model(gating="hard")
    with pytest.raises(ConfigError, match=r"would freeze randomly initialised experts"):
        model(freeze_experts=True, stage1_epochs=0)
    with pytest.raises(ConfigError, match=r"needs one cost per expert"):
        model(cost={"uni": 1.0})


def test_missing_or_foreign_stage1_checkpoint_is_explained(tmp_path):
    with pytest.raises(
        ConfigError,
        match=(
            r"stage1_ckpt=/nonexistent/last.ckpt does not exist. Pass the .ckpt of an earlier "
            r"fusion=dynmm run"
        ),
    ):
        model(stage1_ckpt="/nonexistent/last.ckpt")
    foreign = tmp_path / "concat.ckpt"
    torch.save({"state_dict": {"model.head.0.weight": torch.zeros(3, 14)}}, foreign)
    with pytest.raises(ConfigError, match=r"holds no expert weights .* not from a fusion=dynmm run"):
        model(stage1_ckpt=str(foreign))
    # a pattern must name one file: two matches are refused, none is "does not exist"
    torch.save({"state_dict": {}}, tmp_path / "epoch001.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "epoch002.ckpt")
    with pytest.raises(
        ConfigError, match=r"epoch\*.ckpt matches 2 files \(epoch001.ckpt, epoch002.ckpt\); name one"
    ):
        model(stage1_ckpt=str(tmp_path / "epoch*.ckpt"))
    with pytest.raises(ConfigError, match=r"best\*.ckpt does not exist"):
        model(stage1_ckpt=str(tmp_path / "best*.ckpt"))


def test_gates_for_sequences_and_images():
    seq = {"a": torch.randn(4, 6, 2), "b": torch.randn(4, 6, 3)}
    enc = {"a": MLPEncoder(12, [4]), "b": MLPEncoder(18, [4])}
    m = DynMMFusion(enc, 2, experts=EXPERTS, gate="transformer", stage1_epochs=0)
    out = m.eval()(seq)
    assert out.logits.shape == (4, 2) and m.gate.num_outputs == 2
    img = {"a": torch.randn(4, 1, 8, 8), "b": torch.randn(4, 2, 8, 8)}
    enc = {"a": MLPEncoder(64, [4]), "b": MLPEncoder(128, [4])}
    m = DynMMFusion(enc, 2, experts=EXPERTS, gate="conv", stage1_epochs=0)
    assert m.train()(img).logits.shape == (4, 2)
    with pytest.raises(ConfigError, match=r"conv gate needs images"):
        DynMMFusion(enc, 2, experts=EXPERTS, gate="conv", stage1_epochs=0)(
            {"a": torch.randn(4, 64), "b": torch.randn(4, 128)}
        )


def test_conv_gate_pools_images_of_different_sizes():
    """AV-MNIST: a 28 x 28 digit and a 112 x 112 spectrogram; size=28 averages the spectrogram over 4 x 4
    blocks."""
    x = {"image": torch.randn(3, 1, 28, 28), "audio": torch.randn(3, 1, 112, 112)}
    with pytest.raises(ConfigError, match=r"of one size H x W.*set fusion.gate_args.size"):
        ConvGate(2, ["image", "audio"])(x)
    gate = ConvGate(2, ["image", "audio"], size=28)
    seen = {}
    gate.features.register_forward_pre_hook(lambda mod, args: seen.update(stacked=args[0]))
    assert gate(x).shape == (3, 2)
    stacked = seen["stacked"]  # sorted modalities: audio first
    assert stacked.shape == (3, 2, 28, 28)
    torch.testing.assert_close(stacked[:, 0, 0, 0], x["audio"][:, 0, :4, :4].mean(dim=(1, 2)))
    torch.testing.assert_close(stacked[:, 1], x["image"][:, 0])
    with pytest.raises(ConfigError, match=r"gate_args.size must be a positive"):
        ConvGate(2, ["image"], size=0)
