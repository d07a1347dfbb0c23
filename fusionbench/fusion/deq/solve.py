"""Solving and differentiating an equilibrium z* = f(z*) for `DEQFusion`.

Forward: a torchdeq solver under ``no_grad`` (early stopping on the residual), or `anderson_fixed`, a
fixed-iteration Anderson solver with no host synchronisation inside its loop (the fast path: every
shape is static, so `fusionbench.fusion.deq.graph` captures it in a CUDA graph).

Backward (DEQ paper Theorem 1, eqs. 5-6): `adjoint` solves the adjoint fixed point
g = J_f(z*)^T g + dL/dz* and then *checks* it: the per-sample residual ||J^T g + dL/dz* - g|| relative to
||dL/dz*|| must be finite and at most ``fail_tol``. A sample whose adjoint solve fails gets the phantom
gradient instead (Geng et al. 2021: ``steps`` damped iterations z <- (1 - tau) z + tau f(z) at z*,
differentiated; as a series tau * sum_{k<steps} (tau J^T + (1 - tau) I)^k dL/dz*), so a failed backward
solve never feeds an arbitrary vector to the optimiser. `ImplicitGrad` puts it (eager, or replayed from a
CUDA graph) in the backward pass. Counts of solves, failures and the residuals
accumulate in `SolveStats` on the device, without host synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import autograd

from fusionbench.errors import TrainingError

Func = Callable[[torch.Tensor], torch.Tensor]


def count_failure(model, failed: torch.Tensor, message: str) -> None:
    """Count ``model.consecutive_failures``, the training steps in a row whose forward solve failed for some
    sample (one host sync per step, after the solve); at ``model.max_failures`` raise a `TrainingError` with
    ``message`` (``{n}`` stands for the count). `DEQMonitor` logs and warns about per-epoch shares."""
    if not bool(failed.any()):
        model.consecutive_failures = 0
        return
    model.consecutive_failures += 1
    if model.consecutive_failures >= model.max_failures:
        raise TrainingError(message.replace("{n}", str(model.consecutive_failures)))


class SolveStats:
    """Running sums over the backward solves since the last `reset` (device tensors, no host sync)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.solves = self.failed = self.residual = None

    def add(self, failed: torch.Tensor, residual: torch.Tensor) -> None:
        failed, residual = (
            failed.detach().float(),
            torch.nan_to_num(residual.detach().float(), nan=1e6, posinf=1e6),
        )
        if self.solves is None:
            self.solves, self.failed, self.residual = (
                failed.new_zeros(()),
                failed.new_zeros(()),
                failed.new_zeros(()),
            )
        self.solves = self.solves + failed.numel()
        self.failed = self.failed + failed.sum()
        self.residual = self.residual + residual.clamp(max=1e6).sum()

    def summary(self) -> dict[str, float]:
        """``{solves, converged, fallback, rel_residual}`` (shares of samples); empty if nothing was
        solved."""
        if self.solves is None or float(self.solves) == 0:
            return {}
        n = float(self.solves)
        return {
            "solves": n,
            "converged": 1.0 - float(self.failed) / n,
            "fallback": float(self.failed) / n,
            "rel_residual": float(self.residual) / n,
        }


def per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1)


def phantom_series(vjp: Func, grad: torch.Tensor, steps: int, tau: float) -> torch.Tensor:
    """tau * sum_{k<steps} (tau J^T + (1 - tau) I)^k grad: the phantom gradient's adjoint at z*."""
    acc, a = torch.zeros_like(grad), grad
    for _ in range(steps):
        acc = acc + a
        a = tau * vjp(a) + (1 - tau) * a
    return tau * acc


def adjoint(
    func: Func,
    z: torch.Tensor,
    grad: torch.Tensor,
    solve: Callable,
    fail_tol: float,
    steps: int,
    tau: float,
    sync_free: bool,
    batch_global: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The checked solution g of g = J_f(z)^T g + grad, and per sample whether it failed and its relative
    residual.

    Samples whose residual is above ``fail_tol`` (or not finite) get the phantom series instead. ``sync_free``
    computes that fallback always and selects it with ``torch.where`` (no host sync: required inside a CUDA
    graph); otherwise one host sync skips it when no sample failed. ``batch_global`` makes one decision for
    the whole batch (the public code's batch-global residual).
    """
    h = z.clone().requires_grad_()
    with torch.enable_grad():
        fh = func(h)

    def vjp(v: torch.Tensor) -> torch.Tensor:
        return autograd.grad(fh, h, v, retain_graph=True)[0]

    g = solve(lambda v: vjp(v) + grad, torch.zeros_like(grad))
    residual = per_sample_norm(vjp(g) + grad - g) / (per_sample_norm(grad) + 1e-12)
    if batch_global:
        residual = (residual.square().mean().sqrt()).expand_as(residual)
    failed = ~(torch.isfinite(residual) & (residual <= fail_tol)) | ~torch.isfinite(per_sample_norm(g))
    if sync_free or bool(failed.any()):
        fallback = phantom_series(vjp, grad, steps, tau)
        g = torch.where(failed.view(-1, *[1] * (g.dim() - 1)), fallback, g)
    return g, failed, residual


class ImplicitGrad(autograd.Function):
    """Identity in the forward pass; in the backward pass replaces dL/dz by ``solve_adjoint(z, dL/dz)``'s
    checked solution and adds its outcome to ``stats``."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, solve_adjoint: Callable, stats: SolveStats) -> torch.Tensor:
        ctx.solve_adjoint, ctx.stats = solve_adjoint, stats
        ctx.save_for_backward(z.detach())
        return z.view_as(z)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (z,) = ctx.saved_tensors
        g, failed, residual = ctx.solve_adjoint(z, grad)
        ctx.stats.add(failed, residual)
        return g, None, None


def implicit(z_next: torch.Tensor, func: Func, solve: Callable, stats: SolveStats, **opts) -> torch.Tensor:
    """Attach the checked implicit gradient (`adjoint`, eager) to ``z_next = f(z*)``, one step with graph for
    dL/dtheta."""
    return ImplicitGrad.apply(z_next, lambda z, grad: adjoint(func, z, grad, solve, **opts), stats)


def phantom(z_star: torch.Tensor, func: Func, steps: int, tau: float) -> torch.Tensor:
    """Phantom gradient: ``steps`` damped iterations from the (detached) fixed point, with graph."""
    z = z_star
    for _ in range(steps):
        z = (1 - tau) * z + tau * func(z)
    return z


def small_solve(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve the batched, symmetric positive definite n x n systems A x = b (n tiny) by Gauss-Jordan
    elimination.

    Plain tensor arithmetic: no pivoting (not needed for SPD), no LAPACK/cuSOLVER call, no error check, so no
    host synchronisation and nothing a CUDA graph cannot capture; 4 kernels per column.
    """
    n = A.shape[-1]
    M = torch.cat([A, b.unsqueeze(-1)], dim=-1)
    for i in range(n):
        row = M[:, i] / M[:, i, i : i + 1]
        M = M - M[:, :, i : i + 1] * row.unsqueeze(1)  # clears column i everywhere, row i included ...
        M[:, i] = row  # ... which then gets the normalised pivot row
    return M[:, :, n]


def anderson_fixed(func: Func, x0: torch.Tensor, iters: int, m: int = 6, lam: float = 1e-4, tau: float = 1.0):
    """Anderson acceleration for exactly ``iters`` evaluations of ``func``, with no host synchronisation.

    Per-sample mixing as torchdeq's ``anderson_solver`` (memory ``m``, regulariser ``lam``, damping ``tau``)
    but without early stopping, returning the last iterate f(x_k) and its per-sample absolute and relative
    residuals ||f(x_k) - x_k||, ||f(x_k) - x_k|| / ||f(x_k)||. The mixing weights minimise ||G^T alpha||
    subject to sum(alpha) = 1, i.e. alpha = w / sum(w) with (G G^T + lam I) w = 1: the same weights as
    torchdeq's bordered system, solved by `small_solve` so that the loop can be captured in a CUDA graph.
    Returns ``(z, abs_residual, rel_residual)``.
    """
    shape, bsz = x0.shape, x0.shape[0]
    f = lambda v: func(v.view(shape)).reshape(bsz, -1)  # noqa: E731
    x = x0.reshape(bsz, -1)
    dim = x.shape[1]
    X = x.new_zeros(bsz, m, dim)
    F = x.new_zeros(bsz, m, dim)
    X[:, 0], F[:, 0] = x, f(x)
    last_x, last_f = X[:, 0], F[:, 0]
    if iters >= 2:
        X[:, 1], F[:, 1] = F[:, 0], f(F[:, 0])
        last_x, last_f = X[:, 1], F[:, 1]
    reg = lam * torch.eye(m, dtype=x.dtype, device=x.device)
    ones = x.new_ones(bsz, m)
    for k in range(2, iters):
        n = min(k, m)
        G = F[:, :n] - X[:, :n]
        w = small_solve(torch.bmm(G, G.transpose(1, 2)) + reg[:n, :n], ones[:, :n])
        alpha = (w / w.sum(dim=1, keepdim=True)).unsqueeze(1)
        new_x = (alpha @ F[:, :n])[:, 0]
        if tau != 1.0:
            new_x = tau * new_x + (1 - tau) * (alpha @ X[:, :n])[:, 0]
        new_f = f(new_x)
        X[:, k % m], F[:, k % m] = new_x, new_f
        last_x, last_f = new_x, new_f
    abs_res = (last_f - last_x).norm(dim=1)
    rel_res = abs_res / (last_f.norm(dim=1) + 1e-9)
    return last_f.view(shape), abs_res, rel_res
