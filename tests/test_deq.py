"""DEQ fusion: fixed points, implicit gradients, ablation switches, solver failures, MM-Dynamics."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from fusionbench.encoders import IdentityEncoder, MLPEncoder
from fusionbench.errors import ConfigError, TrainingError
from fusionbench.fusion import ConcatFusion, DEQFusion, MMDynamics

WIDTH = 64  # 16 channels per GroupNorm group; with 2 per group GN is close to a sign function


def identity_encoders(n: int = 2, width: int = WIDTH) -> nn.ModuleDict:
    return nn.ModuleDict({f"m{i}": IdentityEncoder(width) for i in range(n)})


def inputs(n: int = 2, batch: int = 4, width: int = WIDTH, dtype=None, grad=False) -> dict[str, torch.Tensor]:
    g, dtype = torch.Generator().manual_seed(7), dtype or torch.get_default_dtype()
    return {
        f"m{i}": torch.randn(batch, width, generator=g, dtype=dtype).requires_grad_(grad) for i in range(n)
    }


def contractive(model: DEQFusion, scale: float = 0.3) -> DEQFusion:
    """Shrink the weight matrices so the layer is a contraction and solvers converge tightly."""
    with torch.no_grad():
        for p in (model.lin1.weight, model.lin2.weight, model.gate.weight, model.fuse_lin.weight):
            p.mul_(scale)
    return model


def tight(**kw) -> dict:
    return dict(
        f_max_iter=200,
        b_max_iter=200,
        f_tol=1e-11,
        b_tol=1e-11,
        f_stop_mode="abs",
        b_stop_mode="abs",
        max_failures=10**9,
        **kw,
    )


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def test_returned_state_is_a_fixed_point():
    torch.manual_seed(0)
    model = contractive(DEQFusion(identity_encoders(3), num_outputs=2, f_tol=1e-5, f_max_iter=200)).eval()
    x = inputs(3)
    fused, _, info = model.combine(x)
    assert float(info["deq/converged"]) == 1.0 and float(info["deq/rel_residual"]) <= 1e-5
    # applying the layer once more changes nothing
    xs, x_fuse = model.inputs(x)
    state = torch.zeros(4, 4, WIDTH)
    for _ in range(300):  # plain iteration reaches the same equilibrium
        state = model.layer(state, xs, x_fuse)
    assert torch.allclose(fused, state[:, -1], atol=1e-4)


@pytest.mark.parametrize("residual", [False, True])
def test_implicit_gradients_match_a_long_unrolled_solve(float64, residual):
    torch.manual_seed(0)
    deq = contractive(DEQFusion(identity_encoders(), num_outputs=3, residual=residual, **tight()))
    unrolled = DEQFusion(identity_encoders(), num_outputs=3, residual=residual, mode="unrolled", depth=400)
    unrolled.load_state_dict(deq.state_dict())
    x = inputs(dtype=torch.float64, grad=True)
    wrt = lambda m: [x["m0"], x["m1"], m.lin1.weight, m.gate.weight, m.fuse_lin.bias, m.inject_weights]  # noqa: E731
    g_ift = torch.autograd.grad(deq(x).logits.square().sum(), wrt(deq))
    g_unr = torch.autograd.grad(unrolled(x).logits.square().sum(), wrt(unrolled))
    for a, b in zip(g_ift, g_unr):
        assert float((a - b).norm() / b.norm()) < (
            1e-4 if residual else 1e-8
        )  # residual=True contracts slower


def test_implicit_gradient_matches_finite_differences(float64):
    torch.manual_seed(1)
    model = contractive(DEQFusion(identity_encoders(), num_outputs=1, **tight()))
    x = inputs(batch=2, dtype=torch.float64)
    x["m0"].requires_grad_(True)
    g = torch.autograd.grad(model(x).logits.sum(), x["m0"])[0]
    eps = 1e-6
    for idx in [(0, 0), (1, 5), (0, 33)]:
        plus, minus = (
            {k: v.detach().clone() for k, v in x.items()},
            {k: v.detach().clone() for k, v in x.items()},
        )
        plus["m0"][idx] += eps
        minus["m0"][idx] -= eps
        with torch.no_grad():
            fd = (model(plus).logits.sum() - model(minus).logits.sum()) / (2 * eps)
        assert float(g[idx]) == pytest.approx(float(fd), rel=1e-4, abs=1e-8)


def test_phantom_gradient_points_the_same_way(float64):
    torch.manual_seed(0)
    ift = contractive(DEQFusion(identity_encoders(), num_outputs=3, **tight()))
    phantom = DEQFusion(
        identity_encoders(), num_outputs=3, grad="phantom", phantom_steps=20, phantom_tau=1.0, **tight()
    )
    phantom.load_state_dict(ift.state_dict())
    x = inputs(dtype=torch.float64)
    a = torch.autograd.grad(ift(x).logits.square().sum(), ift.lin1.weight)[0].flatten()
    b = torch.autograd.grad(phantom(x).logits.square().sum(), phantom.lin1.weight)[0].flatten()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99


def test_recursion_off_is_one_application_from_zero():
    torch.manual_seed(0)
    model = DEQFusion(identity_encoders(3), num_outputs=2, recursion=False)
    x = inputs(3)
    fused, aux, info = model.combine(x)
    xs, x_fuse = model.inputs(x)
    once = model.layer(torch.zeros(4, 4, WIDTH), xs, x_fuse)
    assert torch.equal(fused, once[:, -1]) and aux is None and info == {}
    # from zero the gate multiplies a zero z_fuse: the fused state is GN(ReLU(b_fuse + x_fuse))
    x_fuse = xs.sum(1)  # w_i = 1 at initialisation
    expected = model.fuse_gn(torch.relu(model.fuse_lin.bias + x_fuse).unsqueeze(1)).squeeze(1)
    assert torch.allclose(fused, expected, atol=1e-6)


def test_everything_off_is_the_weighted_sum():
    model = DEQFusion(
        identity_encoders(),
        num_outputs=2,
        use_f_theta=False,
        use_f_fuse=False,
        recursion=False,
        inject_norm=False,
    )
    with torch.no_grad():
        model.inject_weights.copy_(torch.tensor([2.0, -1.0]))
    x = inputs()
    assert torch.allclose(model.combine(x)[0], 2 * x["m0"] - x["m1"])
    assert sum(p.numel() for p in model.parameters()) == 2 + (WIDTH * 2 + 2)  # w_i and the head only


def test_ablated_parts_hold_no_parameters_and_act_as_the_paper_says():
    x = inputs()
    xs = torch.stack([x[m] for m in sorted(x)], 1)
    no_theta = DEQFusion(identity_encoders(), num_outputs=2, use_f_theta=False)
    assert not hasattr(no_theta, "lin1")
    assert torch.equal(no_theta.f_theta(torch.randn_like(xs), xs), xs)  # z_i = x_i
    no_fuse = DEQFusion(identity_encoders(), num_outputs=2, use_f_fuse=False)
    assert not hasattr(no_fuse, "fuse_lin")
    assert torch.allclose(
        no_fuse.f_fuse(torch.randn(4, WIDTH), xs, xs.sum(1)), xs.sum(1)
    )  # z_fuse = sum_i w_i z_i
    no_gate = DEQFusion(identity_encoders(), num_outputs=2, use_gate=False)
    assert no_gate.gate is None


@pytest.mark.parametrize(
    "switches",
    [
        dict(zip(("use_f_theta", "use_f_fuse", "recursion", "use_gate"), v))
        for v in itertools.product([True, False], repeat=4)
    ],
)
@pytest.mark.parametrize("mode", ["deq", "unrolled"])
def test_every_ablation_runs_forward_and_backward(switches, mode):
    torch.manual_seed(0)
    model = DEQFusion(
        identity_encoders(3, 16), num_outputs=2, mode=mode, depth=3, f_max_iter=8, jac_weight=1.0, **switches
    )
    x = inputs(3, width=16, grad=True)
    out = model(x)
    loss = out.logits.square().sum() + (out.aux_loss if out.aux_loss is not None else 0)
    loss.backward()
    assert (
        torch.isfinite(out.logits).all() and x["m0"].grad is not None and torch.isfinite(x["m0"].grad).all()
    )
    used = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"head.0.weight", "inject_weights"} <= used


def test_jacobian_penalty_reaches_the_layer_parameters():
    torch.manual_seed(0)
    model = DEQFusion(identity_encoders(), num_outputs=2, jac_weight=5.0, f_max_iter=20)
    out = model(inputs())
    assert out.aux_loss is not None and float(out.aux_loss) > 0
    assert float(out.info["deq/jac_loss"]) == pytest.approx(float(out.aux_loss) / 5.0)
    out.aux_loss.backward()
    for p in (model.lin1.weight, model.lin2.weight, model.gate.weight, model.fuse_lin.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    model.eval()
    assert model(inputs()).aux_loss is None  # only while training


def test_batch_global_residual_mode_uses_one_norm_for_the_batch():
    torch.manual_seed(0)
    model = contractive(
        DEQFusion(
            identity_encoders(),
            num_outputs=2,
            residual_norm="batch",
            f_stop_mode="abs",
            f_tol=1e-4,
            f_max_iter=100,
        )
    )
    _, _, info = model.eval().combine(inputs(batch=5))
    # the batch is solved as one vector, so every sample reports the same step count
    assert float(info["deq/nstep"]) == int(info["deq/nstep"])
    assert float(info["deq/abs_residual"]) < 2e-4  # one norm over all 5 samples


@pytest.mark.parametrize("solver", ["anderson", "broyden", "fixed_point_iter"])
def test_every_solver_converges_on_a_contraction(solver):
    torch.manual_seed(0)
    model = contractive(
        DEQFusion(
            identity_encoders(), num_outputs=2, f_solver=solver, b_solver=solver, f_tol=1e-5, f_max_iter=200
        )
    )
    _, _, info = model.eval().combine(inputs())
    assert float(info["deq/converged"]) == 1.0


def test_non_convergence_is_counted_then_stops_training():
    torch.manual_seed(0)
    model = DEQFusion(identity_encoders(3, 8), num_outputs=2, f_max_iter=3, failure_tol=1e-9, max_failures=3)
    x = inputs(3, width=8)
    for _ in range(2):
        assert float(model(x).info["deq/f_failed"]) == 1.0  # every sample's solve failed
    assert model.consecutive_failures == 2
    summary = model.forward_stats["train"].summary()
    assert (summary["solves"], summary["converged"], summary["fallback"]) == (
        8.0,
        0.0,
        1.0,
    )  # 2 steps x 4 samples
    with pytest.raises(TrainingError, match="3 consecutive training steps.*fusion.f_max_iter.*jac_weight"):
        model(x)
    model.eval()
    model(x)  # evaluation never stops
    assert model.forward_stats["eval"].summary()["converged"] == 0.0


def test_injected_features_are_normalised_so_their_scale_does_not_matter():
    torch.manual_seed(0)
    model = contractive(DEQFusion(identity_encoders(), num_outputs=2, f_tol=1e-6, f_max_iter=100)).eval()
    x = inputs()
    xs, x_fuse = model.inputs(x)
    groups = xs.reshape(
        4, 2, 4, WIDTH // 4
    )  # 4 GroupNorm groups per modality, affine at its initial identity
    assert torch.allclose(groups.mean(-1), torch.zeros(4, 2, 4), atol=1e-5)
    assert torch.allclose(groups.var(-1, unbiased=False), torch.ones(4, 2, 4), atol=1e-3)
    assert torch.allclose(x_fuse, xs.sum(1))  # eq. 12 on the normalised features, w_i = 1
    small = {m: 0.1 * v for m, v in x.items()}  # an encoder with 10x smaller outputs: the same equilibrium
    assert torch.allclose(model.combine(small)[0], model.combine(x)[0], atol=1e-2)
    public = DEQFusion(identity_encoders(), num_outputs=2, inject_norm=False)
    assert public.inject_norm is None and torch.equal(public.inputs(x)[0], torch.stack([x["m0"], x["m1"]], 1))


def test_encoder_dropout_overrides_the_backbone_rate():
    def encoders() -> nn.ModuleDict:
        return nn.ModuleDict({m: MLPEncoder(6, hidden_dims=[8, WIDTH], dropout=0.3) for m in ("a", "b")})

    rates = lambda model: {mod.p for mod in model.encoders.modules() if isinstance(mod, nn.Dropout)}  # noqa: E731
    assert rates(DEQFusion(encoders(), num_outputs=2)) == {0.0}  # default: no dropout on the injection
    assert rates(DEQFusion(encoders(), num_outputs=2, encoder_dropout=0.1)) == {0.1}
    assert rates(DEQFusion(encoders(), num_outputs=2, encoder_dropout=None)) == {0.3}  # the backbone's
    with pytest.raises(ConfigError, match="encoder_dropout"):
        DEQFusion(encoders(), num_outputs=2, encoder_dropout=1.0)


def _param_grads(model: DEQFusion, x) -> list[torch.Tensor]:
    model.zero_grad()
    out = model(x)
    (out.logits.square().sum() + out.logits[:, 0].sum()).backward()
    return [
        p.grad.clone()
        for p in (model.lin1.weight, model.gate.weight, model.fuse_lin.weight, model.inject_weights)
    ]


def test_backward_solves_are_checked_and_counted(float64):
    torch.manual_seed(0)
    model = contractive(DEQFusion(identity_encoders(), num_outputs=2, **tight()))
    grads = _param_grads(model, inputs())
    stats = model.backward_stats.summary()
    assert stats["solves"] == 4 and stats["converged"] == 1.0 and stats["rel_residual"] < 1e-6
    model.backward_stats.reset()
    assert model.backward_stats.summary() == {}
    assert all(torch.isfinite(g).all() for g in grads)


def test_failed_backward_solve_falls_back_to_the_phantom_gradient(float64):
    torch.manual_seed(0)
    base = contractive(DEQFusion(identity_encoders(), num_outputs=2, **tight()))
    x = inputs()
    # one adjoint step cannot reach a 1e-12 residual: every sample falls back ...
    failing = DEQFusion(
        identity_encoders(),
        num_outputs=2,
        **{**tight(), "b_max_iter": 1},
        b_failure_tol=1e-12,
        phantom_steps=7,
        phantom_tau=0.6,
    )
    failing.load_state_dict(base.state_dict())
    fallback = _param_grads(failing, x)
    assert failing.backward_stats.summary()["fallback"] == 1.0
    # ... to exactly the phantom gradient (7 damped steps at the fixed point, differentiated)
    phantom = DEQFusion(
        identity_encoders(), num_outputs=2, **tight(), grad="phantom", phantom_steps=7, phantom_tau=0.6
    )
    phantom.load_state_dict(base.state_dict())
    for a, b in zip(fallback, _param_grads(phantom, x)):
        assert torch.allclose(a, b, atol=1e-8)
    # and a passing check keeps the implicit gradient, which differs from the truncated one
    assert not torch.allclose(_param_grads(base, x)[0], fallback[0], atol=1e-6)


def test_phantom_series_is_the_damped_neumann_sum(float64):
    from fusionbench.fusion.deq.solve import phantom_series

    J = torch.randn(5, 5) * 0.3
    grad = torch.randn(1, 5)
    got = phantom_series(lambda v: v @ J, grad, steps=4, tau=0.5)
    M = 0.5 * J + 0.5 * torch.eye(5)
    expected = 0.5 * sum(grad @ torch.linalg.matrix_power(M, k) for k in range(4))
    assert torch.allclose(got, expected)


def test_fixed_iteration_anderson_matches_torchdeq_on_a_contraction(float64):
    from torchdeq.solver import get_solver

    from fusionbench.fusion.deq.solve import anderson_fixed

    torch.manual_seed(0)
    A = torch.randn(3, 10, 10) * 0.1
    b = torch.randn(3, 10)
    f = lambda z: torch.tanh(torch.einsum("bij,bj->bi", A, z) + b)  # noqa: E731
    calls = []
    z, abs_res, rel_res = anderson_fixed(lambda z: calls.append(1) or f(z), torch.zeros(3, 10), iters=40)
    assert len(calls) == 40  # exactly iters evaluations: no early exit, no data-dependent branch
    ref, _, _ = get_solver("anderson")(f, torch.zeros(3, 10), max_iter=200, tol=1e-12, stop_mode="abs")
    assert torch.allclose(z, ref, atol=1e-9) and float(abs_res.max()) < 1e-6 and rel_res.shape == (3,)


def test_fixed_iteration_path_gives_the_eager_fixed_point_and_gradients(float64):
    torch.manual_seed(0)
    eager = contractive(DEQFusion(identity_encoders(), num_outputs=2, **tight()))
    fast = DEQFusion(
        identity_encoders(), num_outputs=2, **tight(), fixed_iterations=True
    )  # 200 steps each way
    fast.load_state_dict(eager.state_dict())
    x = inputs()
    fused, _, info = fast.combine(x)
    assert float(info["deq/nstep"]) == 200 and float(info["deq/abs_residual"]) < 1e-6
    assert torch.allclose(fused, eager.combine(x)[0], atol=1e-10)  # the same Anderson iterates
    for a, b in zip(_param_grads(fast, x), _param_grads(eager, x)):
        assert torch.allclose(a, b, atol=1e-7)
    assert fast.backward_stats.summary()["converged"] == 1.0
    # a failing backward in the sync-free path falls back per sample through torch.where
    fast.b_failure_tol = 1e-30
    _param_grads(fast, x)
    assert fast.backward_stats.summary()["fallback"] == pytest.approx(0.5)  # 4 of the 8 solves so far


def test_small_solve_matches_lapack_on_spd_systems(float64):
    from fusionbench.fusion.deq.solve import small_solve

    torch.manual_seed(0)
    for n in (1, 2, 6):
        G = torch.randn(5, n, 30)
        A = G @ G.transpose(1, 2) + 1e-4 * torch.eye(n)
        b = torch.randn(5, n)
        assert torch.allclose(small_solve(A, b), torch.linalg.solve(A, b), atol=1e-8)


def test_cuda_graph_option_needs_fixed_iterations_and_falls_back_on_cpu(float64, caplog):
    with pytest.raises(ConfigError, match="cuda_graph=true needs fusion.fixed_iterations=true"):
        DEQFusion(identity_encoders(), num_outputs=2, cuda_graph=True)
    torch.manual_seed(0)
    fixed = contractive(
        DEQFusion(identity_encoders(), num_outputs=2, fixed_iterations=True, f_max_iter=20, b_max_iter=21)
    )
    graphed = DEQFusion(
        identity_encoders(),
        num_outputs=2,
        fixed_iterations=True,
        cuda_graph=True,
        f_max_iter=20,
        b_max_iter=21,
    )
    graphed.load_state_dict(fixed.state_dict())
    x = inputs()
    for a, b in zip(
        _param_grads(graphed, x), _param_grads(fixed, x)
    ):  # CPU tensors: the eager fixed path, exactly
        assert torch.equal(a, b)
    assert (
        sum("cuda_graph=true has no effect on CPU" in r.message for r in caplog.records) == 1
    )  # warned once
    import copy
    import pickle

    assert (
        isinstance(pickle.loads(pickle.dumps(graphed)), DEQFusion) and copy.deepcopy(graphed)._graphs is None
    )


def test_misspelt_or_invalid_knobs_fail():
    with pytest.raises(TypeError, match="f_stop_mod"):
        DEQFusion(identity_encoders(), num_outputs=2, f_stop_mod="abs")
    with pytest.raises(ConfigError, match=r"fusion.f_solver='andersen' is not one of"):
        DEQFusion(identity_encoders(), num_outputs=2, f_solver="andersen")
    with pytest.raises(ConfigError, match="same width"):
        DEQFusion(nn.ModuleDict({"a": IdentityEncoder(8), "b": IdentityEncoder(12)}), num_outputs=2)
    with pytest.raises(ConfigError, match="not divisible by fusion.groups=4"):
        DEQFusion(identity_encoders(width=10), num_outputs=2)


def test_modality_blocks_are_independent_per_modality():
    """The batched product equals N separate Linear layers."""
    torch.manual_seed(0)
    model = DEQFusion(identity_encoders(3, 16), num_outputs=2)
    z = torch.randn(5, 3, 16)
    out = model.lin1(z)
    for i in range(3):
        expected = z[:, i] @ model.lin1.weight[i].T + model.lin1.bias[i]
        assert torch.allclose(out[:, i], expected, atol=1e-6)
    gn = nn.GroupNorm(4, 16)
    with torch.no_grad():
        gn.weight.copy_(model.gn1.weight[1] + 0.5)
        model.gn1.weight[1].add_(0.5)
    assert torch.allclose(model.gn1(z)[:, 1], gn(z[:, 1]), atol=1e-5)


def test_mmdynamics_losses_and_fusions():
    torch.manual_seed(0)
    enc = nn.ModuleDict({m: MLPEncoder(6, [16], dropout=0.5) for m in ("meth", "mrna")})
    x = {m: torch.rand(8, 6) for m in enc}
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    for fusion in (ConcatFusion, lambda **kw: DEQFusion(f_max_iter=10, **kw)):
        model = MMDynamics(enc, num_outputs=3, fusion=fusion)
        out = model(x)
        assert out.logits.shape == (8, 3)
        terms = model.target_loss(out, y)
        # hand computation of the per-view terms
        view = {}
        for m in ("meth", "mrna"):
            logits = out.extras["tcp_logits"][m]
            p = logits.softmax(1)[torch.arange(8), y]
            view[m] = (
                out.extras["gate"][m].mean() + ((out.extras["confidence"][m].squeeze(1) - p) ** 2).mean()
            )
            view[m] = view[m] + torch.nn.functional.cross_entropy(logits, y)
        assert torch.allclose(terms, view["meth"] + view["mrna"])
        # the public DEQ code's recursion r = 1.5: 1.5^2 CE + 1.5 (meth terms) + (mrna terms),
        # CE added by the task
        model.view_loss_recursion = 1.5
        ce = torch.nn.functional.cross_entropy(out.logits, y)
        assert torch.allclose(model.target_loss(out, y) + ce, 2.25 * ce + 1.5 * view["meth"] + view["mrna"])
        terms.backward()
        assert model.informativeness["mrna"].weight.grad.abs().sum() > 0


def test_pickles_for_ddp_spawn():
    import pickle

    torch.manual_seed(0)
    model = DEQFusion(identity_encoders(), num_outputs=2, f_max_iter=10).eval()
    copy = pickle.loads(pickle.dumps(model))
    x = inputs()
    assert torch.equal(model(x).logits, copy(x).logits)


def test_dropout_mask_is_fixed_during_one_solve():
    torch.manual_seed(0)
    model = DEQFusion(identity_encoders(), num_outputs=2, dropout=0.5, f_max_iter=5)
    x = inputs()
    model.combine(x)
    mask = model._drop_mask
    assert mask is not None and set(mask.unique().tolist()) <= {0.0, 2.0}
    xs = torch.stack([x[m] for m in model.modalities], 1)
    state, x_fuse = torch.randn(4, 3, WIDTH), xs.sum(1)
    assert torch.equal(
        model.layer(state, xs, x_fuse), model.layer(state, xs, x_fuse)
    )  # same f within a solve
    model.eval()
    model.combine(x)
    assert model._drop_mask is None
