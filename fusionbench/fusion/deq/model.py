"""Deep equilibrium multimodal fusion (Ni et al., "Deep Equilibrium Multimodal Fusion").

State z = [z_1, ..., z_N, z_fuse], each of width d, solved jointly for the fixed point (eq. 14)
of

    per-modality blocks (eq. 8):   z_i <- f_theta_i(z_i; x_i)
        zh_i = ReLU(GN(A_i z_i + a_i));  zt_i = GN(B_i zh_i + x_i + b_i);  f = GN(ReLU(zt_i [+ z_i]))
    purify-then-combine (eqs. 9-11), with the freshly updated z_i:
        alpha_i = G(z_fuse + z_i) = W_a (z_fuse + z_i) + b_a;   z'_i = alpha_i * z_fuse
        z_fuse <- GN(ReLU(W_f sum_i z'_i + b_f + x_fuse))
    injection (eq. 12):            x_fuse = sum_i w_i x_i,  w_i learnable, initialised to 1

by a root solver on g = f(z) - z (eqs. 15-17), with implicit differentiation through the
equilibrium (Theorem 1, eqs. 5-6) or phantom gradients, both from torchdeq. The head reads z_fuse*.

Where the public code differs from the paper, the option and its default:
- ``residual=True``: the code adds z_i back before the last ReLU of f_theta_i (eq. 8 has no such
  term). Default on: it is what produced the reported numbers.
- ``gate="linear"``: the code's G is a bare linear layer (no sigmoid), as eq. 9 also writes it;
  ``gate="sigmoid"`` gives the "soft gate" of the prose.
- ``groups=4``: GroupNorm groups are hard-coded to 4 in the code.
- ``residual_norm="batch"``: the code's solver stops on one absolute residual norm over the whole
  batch; the default ``"sample"`` uses torchdeq's per-sample norms (``f_stop_mode`` rel or abs).
- ``f_max_iter/b_max_iter``: the public BRCA scripts use 105/106 (its module defaults 55/56); the default
  here, 30/31 (also in ``configs/fusion/deq.yaml``), converges on ROSMAP (Table 8) and BRCA experiments set
  105/106.

Departures that make the method train from the first epoch (both on by default; off = public code):
- ``inject_norm=True``: the injected features x_i pass through a GroupNorm (per-modality affine) before
  eqs. 8 and 12. Every other term of the layer is GroupNorm-normalised; encoder outputs are not (on
  ROSMAP their RMS is 0.14 against the state's 1.0), so at initialisation the injection is drowned, the
  layer is not a contraction (Jacobian norm 1.9) and 30 solver steps stop at a relative residual of
  0.1-0.26. Normalised, the first epoch's solves reach 0.005.
- ``encoder_dropout=0.0``: the dropout rate of every ``nn.Dropout`` in the encoders feeding DEQ fusion
  (``None`` keeps the backbone's). The per-sample GroupNorms re-normalise each group of 8 features, which
  turns a dropout mask on the injection into large changes of the equilibrium; with the ROSMAP backbone's
  0.3 the training loss stays at chance for 60-100 epochs, with 0 it falls as fast as late fusion's.
  Regularise inside the layer with ``dropout`` (one mask per solve) instead.

Gradients: ``grad="ift"`` solves the adjoint system with ``b_solver`` and checks its residual; a sample
whose backward solve fails (residual above ``b_failure_tol`` x ||dL/dz*||, or not finite) gets the phantom
gradient instead, and the share is counted (`fusionbench.fusion.deq.solve`, logged by
`fusionbench.fusion.deq.callbacks.DEQMonitor`). ``fixed_iterations=True`` runs exactly ``f_max_iter`` /
``b_max_iter`` Anderson steps with no host synchronisation inside the loops (convergence is checked once,
after the solve); ``cuda_graph=True`` then replays both solves from CUDA graphs on a GPU
(`fusionbench.fusion.deq.graph`), the fast path measured by ``scripts/bench_fusion.py``.

Ablations of Tables 5-7 (paper §3.2): ``use_f_theta=False`` sets z_i = x_i; ``use_f_fuse=False`` sets
z_fuse = sum_i w_i z_i (no purify-then-combine, so no gate); ``recursion=False`` applies every
function once from z = 0; ``use_gate=False`` sets z'_i = z_i. ``mode="unrolled"`` iterates the same
layer ``depth`` times from zero and backpropagates through every step (the weight-tied
baseline of Figure 4).

All N modality blocks run as one batched matrix product per layer, so a solver step costs the same
number of kernel launches for 2 or 20 modalities.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F
from torchdeq.loss import jac_reg
from torchdeq.solver import get_solver, register_solver

from fusionbench.errors import ConfigError, check_choices
from fusionbench.fusion.base import EncoderFusion, require_equal_dims
from fusionbench.fusion.deq.graph import SolveGraphs
from fusionbench.fusion.deq.solve import (
    ImplicitGrad,
    SolveStats,
    anderson_fixed,
    count_failure,
    implicit,
    phantom,
)

log = logging.getLogger("fusionbench")

SOLVERS = ("anderson", "broyden", "fixed_point_iter")


def _batch_global(solver_name: str):
    """A torchdeq solver that measures the residual over the whole batch at once (public DEQ code)."""
    solver = get_solver(solver_name)

    def solve(func, x0, **kwargs):
        shape = x0.shape
        z, states, info = solver(lambda z: func(z.reshape(shape)).reshape(1, -1), x0.reshape(1, -1), **kwargs)
        info = {
            k: (v.expand(shape[0]) if torch.is_tensor(v) and v.dim() == 1 and v.numel() == 1 else v)
            for k, v in info.items()
        }
        return z.reshape(shape), [s.reshape(shape) for s in states], info

    return solve


for _name in SOLVERS:
    register_solver(f"{_name}_global", _batch_global(_name))


def set_dropout(module: nn.Module, rate: float | None) -> None:
    """Set the rate of every ``nn.Dropout`` inside ``module`` (``None``: leave them as built)."""
    if rate is not None:
        for m in module.modules():
            if isinstance(m, nn.Dropout):
                m.p = rate


class BatchedGroupNorm(nn.Module):
    """GroupNorm applied to (B, N, d) with separate affine parameters for each of the N slots."""

    def __init__(self, slots: int, dim: int, groups: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(slots, dim))
        self.bias = nn.Parameter(torch.zeros(slots, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # N slots of `groups` groups each are N * groups consecutive groups of (B, N * d): one fused kernel
        b, n, d = x.shape
        out = F.group_norm(
            x.reshape(b, n * d), n * self.groups, self.weight.reshape(-1), self.bias.reshape(-1), self.eps
        )
        return out.reshape(b, n, d)


class BatchedLinear(nn.Module):
    """N independent Linear(d, d) layers applied as one batched product on (B, N, d)."""

    def __init__(self, slots: int, dim: int) -> None:
        super().__init__()
        bound = 1 / math.sqrt(dim)  # nn.Linear's default initialisation, per slot
        self.weight = nn.Parameter(torch.empty(slots, dim, dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(slots, dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bnd,ned->bne", x, self.weight) + self.bias


class DEQFusion(EncoderFusion):
    """Args:
    encoders, num_outputs, head_hidden, head_dropout: see `EncoderFusion`; every encoder must output
        the fusion width d (project in the backbone), divisible by ``groups``.
    use_f_theta, use_f_fuse, recursion, use_gate: ablation switches (module docstring).
    mode: ``"deq"`` (solve for the equilibrium) or ``"unrolled"`` (weight-tied, ``depth`` layers).
    depth: depth of the unrolled mode.
    residual: add z_i inside f_theta_i as the public code does.
    gate: ``"linear"`` (code, eq. 9) or ``"sigmoid"``.
    groups: GroupNorm groups.
    dropout: dropout on the fused state after each f_fuse application (the paper's "dropout in
        fusion layer" for BRCA, rate unstated); one mask per forward pass so the solver iterates a
        fixed function. 0 disables it.
    f_solver, b_solver: ``anderson``, ``broyden`` or ``fixed_point_iter`` (forward / backward).
    f_max_iter, b_max_iter, f_tol, b_tol: iteration caps and tolerances.
    f_stop_mode, b_stop_mode: ``"rel"`` or ``"abs"`` residual.
    residual_norm: ``"sample"`` (per-sample norms, stop when every sample converged) or ``"batch"``
        (one norm over the batch, public code).
    eval_f_max_iter: forward cap at evaluation (default: ``f_max_iter``).
    grad: ``"ift"`` (implicit differentiation, Theorem 1) or ``"phantom"`` (phantom gradient).
    phantom_steps, phantom_tau: steps and damping of the phantom gradient.
    jac_weight: weight of the Jacobian regulariser ||J_f||_F^2 / numel (Hutchinson) in ``aux_loss``.
    jac_freq: probability of computing it at a training step. jac_vecs: random vectors per estimate.
    max_failures: consecutive training steps whose solve failed before training stops.
    failure_tol: a solve fails when its residual (``f_stop_mode``) stays above this, or is not finite.
        Looser than ``f_tol`` on purpose: an untrained layer rarely reaches ``f_tol`` and need not.
    b_failure_tol: a backward solve fails when ||J^T g + dL/dz* - g|| > this x ||dL/dz*||; its samples get
        the phantom gradient (``phantom_steps``, ``phantom_tau``).
    inject_norm: GroupNorm on the injected features (module docstring).
    encoder_dropout: dropout rate forced on the encoders (``None``: the backbone's; module docstring).
    fixed_iterations: fixed-iteration, synchronisation-free Anderson solves (module docstring).
    cuda_graph: replay the fixed-iteration solves from CUDA graphs on a GPU (`fusionbench.fusion.deq.graph`);
        needs ``fixed_iterations``; CUDA tensors only (CPU tensors take the eager fixed-iteration path).
    """

    def __init__(
        self,
        encoders,
        num_outputs: int,
        use_f_theta: bool = True,
        use_f_fuse: bool = True,
        recursion: bool = True,
        use_gate: bool = True,
        mode: str = "deq",
        depth: int = 6,
        residual: bool = True,
        gate: str = "linear",
        groups: int = 4,
        dropout: float = 0.0,
        f_solver: str = "anderson",
        b_solver: str = "anderson",
        f_max_iter: int = 30,
        b_max_iter: int = 31,
        f_tol: float = 1e-3,
        b_tol: float = 1e-6,
        f_stop_mode: str = "rel",
        b_stop_mode: str = "rel",
        residual_norm: str = "sample",
        eval_f_max_iter: int | None = None,
        grad: str = "ift",
        phantom_steps: int = 5,
        phantom_tau: float = 0.5,
        jac_weight: float = 0.0,
        jac_freq: float = 1.0,
        jac_vecs: int = 2,
        max_failures: int = 100,
        failure_tol: float = 0.1,
        b_failure_tol: float = 0.1,
        inject_norm: bool = True,
        encoder_dropout: float | None = 0.0,
        fixed_iterations: bool = False,
        cuda_graph: bool = False,
        head_hidden=(),
        head_dropout: float = 0.0,
    ) -> None:
        super().__init__(encoders, num_outputs, head_hidden=head_hidden, head_dropout=head_dropout)
        choices = {
            "mode": (mode, ("deq", "unrolled")),
            "gate": (gate, ("linear", "sigmoid")),
            "f_solver": (f_solver, SOLVERS),
            "b_solver": (b_solver, SOLVERS),
            "f_stop_mode": (f_stop_mode, ("rel", "abs")),
            "b_stop_mode": (b_stop_mode, ("rel", "abs")),
            "residual_norm": (residual_norm, ("sample", "batch")),
            "grad": (grad, ("ift", "phantom")),
        }
        check_choices("fusion", choices)
        if jac_weight < 0 or not 0 <= jac_freq <= 1 or depth < 1:
            raise ConfigError(
                f"fusion.jac_weight must be >= 0, jac_freq in [0, 1] and depth >= 1, got {jac_weight}, "
                f"{jac_freq}, {depth}."
            )
        d = require_equal_dims(self.embed_dims, "DEQ fusion", self.encoders)
        if d % groups:
            raise ConfigError(
                f"DEQ fusion width {d} is not divisible by fusion.groups={groups}; change the encoders' "
                "output width or the groups."
            )
        n = len(self.modalities)
        self.width, self.num_modalities = d, n
        self.use_f_theta, self.use_f_fuse = use_f_theta, use_f_fuse
        self.recursion, self.use_gate = recursion, use_gate
        self.mode, self.depth, self.residual, self.gate_kind = mode, depth, residual, gate
        self.jac_weight, self.jac_freq, self.jac_vecs = jac_weight, jac_freq, jac_vecs
        self.max_failures, self.failure_tol, self.f_tol = max_failures, failure_tol, f_tol
        self.f_stop_mode = f_stop_mode
        self.consecutive_failures = 0

        self.inject_weights = nn.Parameter(torch.ones(n))  # w_i of eq. 12
        self.inject_norm = BatchedGroupNorm(n, d, groups) if inject_norm else None
        if use_f_theta:  # eq. 8, all modalities batched
            self.lin1, self.lin2 = BatchedLinear(n, d), BatchedLinear(n, d)
            self.gn1, self.gn2, self.gn3 = (BatchedGroupNorm(n, d, groups) for _ in range(3))
        if use_f_fuse:  # eqs. 9-11
            self.gate = nn.Linear(d, d) if use_gate else None
            self.fuse_lin = nn.Linear(d, d)
            self.fuse_gn = BatchedGroupNorm(1, d, groups)
        self.dropout = dropout
        self._drop_mask: torch.Tensor | None = None
        if encoder_dropout is not None and not 0 <= encoder_dropout < 1:
            raise ConfigError(f"fusion.encoder_dropout must be in [0, 1) or null, got {encoder_dropout}.")
        self.encoder_dropout = (
            encoder_dropout  # a wrapper with its own encoders (MM-Dynamics) applies it to them
        )
        set_dropout(self.encoders, encoder_dropout)
        if b_failure_tol <= 0:
            raise ConfigError(f"fusion.b_failure_tol must be > 0, got {b_failure_tol}.")
        if cuda_graph and not fixed_iterations:
            raise ConfigError(
                "fusion.cuda_graph=true needs fusion.fixed_iterations=true: only fixed-iteration solves "
                "have the static shapes a CUDA graph can replay."
            )
        suffix = "_global" if residual_norm == "batch" else ""
        self.grad, self.fixed_iterations, self.cuda_graph = grad, fixed_iterations, cuda_graph
        self._graphs: SolveGraphs | None = None  # captured lazily on the first CUDA solve
        self._warned_cpu_graph = False
        self.f_solver, self.b_solver = f_solver + suffix, b_solver + suffix
        self.f_max_iter, self.b_max_iter, self.eval_f_max_iter = (
            f_max_iter,
            b_max_iter,
            eval_f_max_iter or f_max_iter,
        )
        self.b_tol, self.b_stop_mode = b_tol, b_stop_mode
        self.phantom_steps, self.phantom_tau = phantom_steps, phantom_tau
        self.b_failure_tol, self.global_residual = b_failure_tol, residual_norm == "batch"
        self.backward_stats = SolveStats()  # adjoint solves since the last reset (`DEQMonitor` logs them)
        self.forward_stats = {"train": SolveStats(), "eval": SolveStats()}  # forward solves, by mode
        self.fused_dim = d
        self.build_head()

    # -- the layer ---------------------------------------------------------------------------
    def f_theta(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Eq. 8 for all modalities at once; z, x: (B, N, d)."""
        if not self.use_f_theta:
            return x
        zh = torch.relu(self.gn1(self.lin1(z)))
        zt = self.gn2(self.lin2(zh) + x)
        return self.gn3(torch.relu(zt + z if self.residual else zt))

    def alpha(self, z_fuse: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Eq. 9: gate weights per modality, (B, N, d)."""
        a = self.gate(z_fuse.unsqueeze(1) + z)
        return torch.sigmoid(a) if self.gate_kind == "sigmoid" else a

    def f_fuse(self, z_fuse: torch.Tensor, z: torch.Tensor, x_fuse: torch.Tensor) -> torch.Tensor:
        """Eqs. 10-11 with the freshly updated z (B, N, d); z_fuse, x_fuse: (B, d)."""
        if not self.use_f_fuse:
            return torch.einsum("bnd,n->bd", z, self.inject_weights)
        purified = self.alpha(z_fuse, z) * z_fuse.unsqueeze(1) if self.use_gate else z
        out = self.fuse_gn(torch.relu(self.fuse_lin(purified.sum(1)) + x_fuse).unsqueeze(1)).squeeze(1)
        return out if self._drop_mask is None else out * self._drop_mask

    def layer(self, state: torch.Tensor, x: torch.Tensor, x_fuse: torch.Tensor) -> torch.Tensor:
        """One application of f on the stacked state (B, N+1, d)."""
        z, z_fuse = state[:, :-1], state[:, -1]
        z_new = self.f_theta(z, x)
        return torch.cat([z_new, self.f_fuse(z_fuse, z_new, x_fuse).unsqueeze(1)], dim=1)

    # -- solving -----------------------------------------------------------------------------
    def inputs(self, embeddings: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The injected features x (B, N, d), normalised when ``inject_norm``, and x_fuse (eq. 12)."""
        x = torch.stack([embeddings[m] for m in self.modalities], dim=1)
        if self.inject_norm is not None:
            x = self.inject_norm(x)
        return x, torch.einsum("bnd,n->bd", x, self.inject_weights)

    def combine(self, embeddings: Mapping[str, torch.Tensor]):
        x, x_fuse = self.inputs(embeddings)
        func = lambda s: self.layer(s, x, x_fuse)  # noqa: E731
        state0 = x.new_zeros(x.shape[0], self.num_modalities + 1, self.width)
        # one dropout mask per forward pass, so f stays a fixed function while the solver iterates
        self._drop_mask = None
        if self.training and self.dropout > 0:
            self._drop_mask = torch.bernoulli(x_fuse.new_full(x_fuse.shape, 1 - self.dropout)) / (
                1 - self.dropout
            )
        info: dict[str, torch.Tensor | float] = {}
        aux = None
        if not self.recursion:
            state = func(state0)
        elif self.mode == "unrolled":
            state = state0
            for _ in range(self.depth):
                prev, state = state, func(state)
            info["deq/rel_residual"] = self._rel(state - prev, state).mean().detach()
        elif not self.use_f_theta and not (self.use_f_fuse and self.use_gate):
            # f does not read its state (z_i = x_i, and z_fuse is not fed back): one application is exact
            state = func(state0)
        else:
            state, stats = self.solve(func, state0, x, x_fuse)
            info.update(self._solver_info(stats))
            if self.training and self.jac_weight > 0 and random.random() < self.jac_freq:
                z_star = state.detach().requires_grad_()
                aux = self.jac_weight * jac_reg(func(z_star), z_star, vecs=self.jac_vecs)
                info["deq/jac_loss"] = aux.detach() / self.jac_weight
        return state[:, -1], aux, info

    def solve(
        self, func, state0: torch.Tensor, x: torch.Tensor, x_fuse: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The fixed point of ``func`` (the layer on x, x_fuse) from ``state0`` and the forward solver's
        statistics, with the configured gradient attached when training (`fusionbench.fusion.deq.solve`)."""
        training = self.training and torch.is_grad_enabled()
        max_iter = self.f_max_iter if self.training else self.eval_f_max_iter
        graphs = self._solve_graphs() if self.cuda_graph and state0.is_cuda else None
        if self.cuda_graph and graphs is None and not self._warned_cpu_graph:
            self._warned_cpu_graph = True
            log.warning(
                "fusion.cuda_graph=true has no effect on CPU tensors: the fixed-iteration solves run eagerly."
            )
        with torch.no_grad():
            if graphs is not None:
                z, abs_res, rel_res = graphs.forward(
                    x, x_fuse, self._drop_mask, tuple(state0.shape), max_iter
                )
                stats = {
                    "nstep": torch.full_like(abs_res, max_iter),
                    "abs_lowest": abs_res,
                    "rel_lowest": rel_res,
                }
            elif self.fixed_iterations:
                z, abs_res, rel_res = anderson_fixed(func, state0, max_iter)
                stats = {
                    "nstep": torch.full_like(abs_res, max_iter),
                    "abs_lowest": abs_res,
                    "rel_lowest": rel_res,
                }
            else:
                z, _, stats = get_solver(self.f_solver)(
                    func, state0, max_iter=max_iter, tol=self.f_tol, stop_mode=self.f_stop_mode
                )
        if not training:
            return z, stats
        z = z.detach()
        if self.grad == "phantom":
            return phantom(z, func, self.phantom_steps, self.phantom_tau), stats
        opts = dict(
            fail_tol=self.b_failure_tol,
            steps=self.phantom_steps,
            tau=self.phantom_tau,
            batch_global=self.global_residual,
        )
        if graphs is not None:
            solve_adjoint = graphs.backward(x, x_fuse, self._drop_mask, z, self.b_max_iter, **opts)
            return ImplicitGrad.apply(func(z), solve_adjoint, self.backward_stats), stats
        if self.fixed_iterations:
            b_solve = lambda g_f, g0: anderson_fixed(g_f, g0, self.b_max_iter)[0]  # noqa: E731
        else:
            solver = get_solver(self.b_solver)
            b_opts = dict(max_iter=self.b_max_iter, tol=self.b_tol, stop_mode=self.b_stop_mode)
            b_solve = lambda g_f, g0: solver(g_f, g0, **b_opts)[0]  # noqa: E731
        return implicit(
            func(z), func, b_solve, self.backward_stats, sync_free=self.fixed_iterations, **opts
        ), stats

    def _solve_graphs(self) -> SolveGraphs:
        if self._graphs is None:
            self._graphs = SolveGraphs(self.layer, self._swap_mask)
        return self._graphs

    def _swap_mask(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        previous, self._drop_mask = self._drop_mask, mask
        return previous

    def _apply(self, fn, recurse: bool = True):
        # .to()/.half()/.cuda() may give the parameters new storage: captured graphs would read the old one
        self._graphs = None
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_graphs"] = None  # CUDA graphs are neither picklable nor copyable; recaptured on first use
        return state

    @torch.no_grad()
    def trace(self, embeddings: Mapping[str, torch.Tensor], steps: int = 100) -> dict[str, list[float]]:
        """Convergence diagnostics of Table 8 and Figures 3-4 on one batch, as batch means per step.

        ``iteration_rel_diff[j]``: ||z_fuse^[j+1] - z_fuse^[j]|| / ||z_fuse^[j]|| under plain iteration of the
        layer from zero (steps 1..``steps``; what a weight-tied network computes). ``solver_rel_residual[j]``:
        the forward solver's relative residual ||f(z) - z|| / ||f(z)|| at step j+1 with early stopping off.
        ``gate_share[m][j]``: mean |alpha_m| over features and batch, normalised over modalities (Figure 3).
        """
        x, x_fuse = self.inputs(embeddings)
        state = x.new_zeros(x.shape[0], self.num_modalities + 1, self.width)
        rel, gates = [], []
        for _ in range(steps + 1):
            new = self.layer(state, x, x_fuse)
            if self.use_f_fuse and self.use_gate:
                a = self.alpha(state[:, -1], new[:, :-1]).abs().mean(dim=(0, 2))
                gates.append((a / a.sum()).tolist())
            rel.append(self._rel(new[:, -1] - state[:, -1], state[:, -1]).mean().item())
            state = new
        out: dict = {"iteration_rel_diff": rel[1:]}  # step 0 divides by the zero initial state
        if gates:
            out["gate_share"] = {m: [g[i] for g in gates[1:]] for i, m in enumerate(self.modalities)}
        if self.recursion and self.mode == "deq":
            solver = get_solver(self.f_solver.removesuffix("_global"))  # per-sample traces
            func = lambda s: self.layer(s, x, x_fuse)  # noqa: E731
            _, _, info = solver(func, torch.zeros_like(state), max_iter=steps + 1, tol=0.0, stop_mode="rel")
            # torchdeq pre-fills the steps its solver has not reached with 1e8: report them as missing
            means = [float(t.mean()) for t in info["rel_trace"].reshape(len(state), -1).T][:steps]
            out["solver_rel_residual"] = [v if v < 1e6 else None for v in means]
        return out

    @staticmethod
    def _rel(diff: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return diff.flatten(1).norm(dim=1) / (ref.flatten(1).norm(dim=1) + 1e-9)

    def _solver_info(self, stats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        residual = stats[f"{self.f_stop_mode}_lowest"].detach()
        failed = ~(residual <= self.failure_tol)  # NaN compares False: a NaN solve has failed
        self.forward_stats["train" if self.training else "eval"].add(failed, residual)
        if self.training:
            why = f"last {self.f_stop_mode} residual {float(residual.max()):.3g}, tol {self.failure_tol:.3g}"
            count_failure(
                self,
                failed,
                f"The DEQ fusion solver failed to converge on {{n}} consecutive training steps ({why}). "
                "Try more iterations (fusion.f_max_iter), a Jacobian penalty (fusion.jac_weight=1.0 or "
                "more), another solver (fusion.f_solver=broyden), or a lower learning rate.",
            )
        return {
            "deq/nstep": stats["nstep"].float().mean(),
            f"deq/{self.f_stop_mode}_residual": residual.mean(),
            "deq/abs_residual": stats["abs_lowest"].detach().mean(),
            "deq/converged": (residual <= self.f_tol).float().mean(),  # share of samples within f_tol
            "deq/f_failed": failed.float().mean(),  # share of samples above failure_tol (or not finite)
        }

    def fuse(self, embeddings: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.combine(embeddings)[0]
