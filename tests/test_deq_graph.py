"""The CUDA-graph fast path of DEQ fusion gives the eager fixed-iteration path's fixed points, gradients and
solver statistics (needs a CUDA device; `scripts/gpu_check_deq.sh` runs these on one).

Both paths launch the same kernels in the same order, but cuBLAS may pick other algorithms inside a capture,
so float32 results differ by rounding; Anderson's float32 mixing solve and the backward solve's pass/fail
check amplify that on a layer that is not a contraction (a sample passing its check on one path and falling
back to the phantom gradient on the other). Hence float64 for the exact comparison, and a contractive layer in
float32.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusionbench.encoders import IdentityEncoder
from fusionbench.fusion import DEQFusion

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def pair(dtype: torch.dtype, **kw) -> tuple[DEQFusion, DEQFusion]:
    """The same contractive layer twice on the GPU: eager fixed iterations and CUDA graphs."""
    torch.manual_seed(0)
    enc = lambda: nn.ModuleDict({f"m{i}": IdentityEncoder(64) for i in range(3)})  # noqa: E731
    opts = dict(fixed_iterations=True, f_max_iter=30, b_max_iter=31, max_failures=10**9, **kw)
    eager = DEQFusion(enc(), num_outputs=4, **opts).to("cuda", dtype)
    with torch.no_grad():
        for p in (eager.lin1.weight, eager.lin2.weight, eager.gate.weight, eager.fuse_lin.weight):
            p.mul_(0.3)
    graphed = DEQFusion(enc(), num_outputs=4, cuda_graph=True, **opts).to("cuda", dtype)
    graphed.load_state_dict(eager.state_dict())
    return eager, graphed


def batch(size: int, seed: int, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = {f"m{i}": torch.randn(size, 64, device="cuda", generator=g, dtype=dtype) for i in range(3)}
    return x, torch.randint(0, 4, (size,), device="cuda", generator=g)


def step(model: DEQFusion, opt: torch.optim.Optimizer, x, y) -> tuple[torch.Tensor, dict]:
    out = model(x)
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(out.logits, y).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    opt.step()
    return grads, out.info


# step 0 is bit-identical on an H200; later steps differ by rounding that 30 Anderson steps amplify
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-3)])
@pytest.mark.parametrize("grad", ["ift", "phantom"])
def test_graph_training_steps_match_the_eager_fixed_path(grad, dtype, tol):
    eager, graphed = pair(dtype, grad=grad)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in (eager, graphed)]
    grad_diff, residuals = [], []
    for i, size in enumerate([32, 32, 17, 32]):  # replays after weight updates, and a second captured shape
        x, y = batch(size, i, dtype)
        (g_e, info_e), (g_g, info_g) = (step(m, o, x, y) for m, o in zip((eager, graphed), opts))
        grad_diff.append(float((g_g - g_e).norm() / g_e.norm()))
        residuals.append((float(info_e["deq/rel_residual"]), float(info_g["deq/rel_residual"])))
    print(f"{grad}, {dtype}: relative gradient differences {grad_diff}; residuals (eager, graph) {residuals}")
    assert max(grad_diff) < tol, (
        f"gradients differ by {grad_diff} (relative); residuals (eager, graph) {residuals}"
    )
    for r_e, r_g in residuals:
        assert r_g == pytest.approx(r_e, rel=0.1, abs=1e-6), f"residuals (eager, graph) {residuals}"
    assert len(graphed._graphs.graphs) == (
        4 if grad == "ift" else 2
    )  # forward (+ backward) for two batch sizes, once each
    if grad == "ift":
        assert graphed.backward_stats.summary() == pytest.approx(
            eager.backward_stats.summary(), rel=1e-2, abs=1e-6
        )


def test_graph_eval_and_dropout_match_and_moving_the_module_drops_the_graphs():
    eager, graphed = pair(torch.float64, dropout=0.2)
    x, y = batch(16, 0, torch.float64)
    torch.manual_seed(3)
    g_e, _ = step(eager, torch.optim.SGD(eager.parameters(), lr=0.0), x, y)
    torch.manual_seed(3)  # the same dropout mask, read by the graph from its static copy
    g_g, _ = step(graphed, torch.optim.SGD(graphed.parameters(), lr=0.0), x, y)
    assert float((g_g - g_e).norm() / g_e.norm()) < 1e-9
    eager.eval(), graphed.eval()
    with torch.no_grad():
        assert torch.allclose(graphed(x).logits, eager(x).logits, atol=1e-9)
    graphed.float()
    assert graphed._graphs is None  # new parameter storage: recaptured, never replayed against the old one
    with torch.no_grad():
        assert graphed({k: v.float() for k, v in x.items()}).logits.dtype == torch.float32
