"""Solving and differentiating an equilibrium z* = f(z*) for `DEQFusion`.

Forward: a torchdeq solver under ``no_grad`` (early stopping on the residual), or `anderson_fixed`, a
fixed-iteration Anderson solver with no host synchronisation inside its loop (the fast path: every
shape is static, so the loop can be captured by a CUDA graph or compiled).

Backward (DEQ paper Theorem 1, eqs. 5-6): `ImplicitGrad` solves the adjoint fixed point
g = J_f(z*)^T g + dL/dz* and then *checks* it: the per-sample residual ||J^T g + dL/dz* - g|| relative to
||dL/dz*|| must be finite and at most ``fail_tol``. A sample whose adjoint solve fails gets the phantom
gradient instead (Geng et al. 2021: ``steps`` damped iterations z <- (1 - tau) z + tau f(z) at z*,
differentiated; as a series tau * sum_{k<steps} (tau J^T + (1 - tau) I)^k dL/dz*), so a failed backward
solve never feeds an arbitrary vector to the optimiser. Counts of solves, failures and the residuals
accumulate in `SolveStats` on the device, without host synchronisation.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import autograd

Func = Callable[[torch.Tensor], torch.Tensor]


class SolveStats:
    """Running sums over the backward solves since the last `reset` (device tensors, no host sync)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.solves = self.failed = self.residual = None

    def add(self, failed: torch.Tensor, residual: torch.Tensor) -> None:
        failed, residual = failed.detach().float(), torch.nan_to_num(residual.detach().float(), nan=1e6, posinf=1e6)
        if self.solves is None:
            self.solves, self.failed, self.residual = failed.new_zeros(()), failed.new_zeros(()), failed.new_zeros(())
        self.solves = self.solves + failed.numel()
        self.failed = self.failed + failed.sum()
        self.residual = self.residual + residual.clamp(max=1e6).sum()

    def summary(self) -> dict[str, float]:
        """``{solves, converged, fallback, rel_residual}`` (shares of samples); empty if nothing was solved."""
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


class ImplicitGrad(autograd.Function):
    """Identity in the forward pass; in the backward pass replaces dL/dz by the checked adjoint solution."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, func: Func, solve: Callable, opts: dict) -> torch.Tensor:
        ctx.func, ctx.solve, ctx.opts = func, solve, opts
        ctx.save_for_backward(z.detach())
        return z.view_as(z)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (z,) = ctx.saved_tensors
        opts = ctx.opts
        h = z.clone().requires_grad_()
        with torch.enable_grad():
            fh = ctx.func(h)

        def vjp(v: torch.Tensor) -> torch.Tensor:
            return autograd.grad(fh, h, v, retain_graph=True)[0]

        g = ctx.solve(lambda v: vjp(v) + grad, torch.zeros_like(grad))
        residual = per_sample_norm(vjp(g) + grad - g) / (per_sample_norm(grad) + 1e-12)
        if opts["batch_global"]:  # one decision for the whole batch (public code's batch-global residual)
            residual = (residual.square().mean().sqrt()).expand_as(residual)
        failed = ~(torch.isfinite(residual) & (residual <= opts["fail_tol"]))
        failed = failed | ~torch.isfinite(per_sample_norm(g))
        # sync-free: compute the fallback always and pick it per sample; otherwise one host sync skips it when no sample failed
        if opts["sync_free"] or bool(failed.any()):
            fallback = phantom_series(vjp, grad, opts["steps"], opts["tau"])
            g = torch.where(failed.view(-1, *[1] * (g.dim() - 1)), fallback, g)
        opts["stats"].add(failed, residual)
        return g, None, None, None


def implicit(z_next: torch.Tensor, func: Func, solve: Callable, **opts) -> torch.Tensor:
    """Attach the checked implicit gradient to ``z_next = f(z*)`` (one step with graph, for dL/dtheta)."""
    return ImplicitGrad.apply(z_next, func, solve, opts)


def phantom(z_star: torch.Tensor, func: Func, steps: int, tau: float) -> torch.Tensor:
    """Phantom gradient: ``steps`` damped iterations from the (detached) fixed point, with graph."""
    z = z_star
    for _ in range(steps):
        z = (1 - tau) * z + tau * func(z)
    return z


def anderson_fixed(func: Func, x0: torch.Tensor, iters: int, m: int = 6, lam: float = 1e-4, tau: float = 1.0):
    """Anderson acceleration for exactly ``iters`` evaluations of ``func``, with no host synchronisation.

    Per-sample mixing as torchdeq's ``anderson_solver`` (memory ``m``, regulariser ``lam``, damping ``tau``)
    but without early stopping, returning the last iterate f(x_k) and its per-sample absolute and relative
    residuals ||f(x_k) - x_k||, ||f(x_k) - x_k|| / ||f(x_k)||. ``torch.linalg.solve_ex`` keeps the
    mixing solve free of error-checking syncs. Returns ``(z, abs_residual, rel_residual)``.
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
    H = x.new_zeros(bsz, m + 1, m + 1)
    H[:, 0, 1:] = H[:, 1:, 0] = 1
    y = x.new_zeros(bsz, m + 1, 1)
    y[:, 0] = 1
    eye = torch.eye(m, dtype=x.dtype, device=x.device)
    for k in range(2, iters):
        n = min(k, m)
        G = F[:, :n] - X[:, :n]
        H[:, 1 : n + 1, 1 : n + 1] = torch.bmm(G, G.transpose(1, 2)) + lam * eye[:n, :n]
        alpha = torch.linalg.solve_ex(H[:, : n + 1, : n + 1], y[:, : n + 1])[0][:, 1 : n + 1, 0]
        new_x = tau * (alpha[:, None] @ F[:, :n])[:, 0] + (1 - tau) * (alpha[:, None] @ X[:, :n])[:, 0]
        new_f = f(new_x)
        X[:, k % m], F[:, k % m] = new_x, new_f
        last_x, last_f = new_x, new_f
    abs_res = (last_f - last_x).norm(dim=1)
    rel_res = abs_res / (last_f.norm(dim=1) + 1e-9)
    return last_f.view(shape), abs_res, rel_res
