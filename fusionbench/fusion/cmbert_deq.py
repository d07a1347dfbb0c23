"""CM-BERT + DEQ fusion (Ni et al., "Deep Equilibrium Multimodal Fusion", Table 3 and the CMU-MOSI half of
Table 7): CM-BERT's weighted sum of its two attention matrices replaced by the equilibrium of a DEQ fusion
layer, as the public code does it (jinhong-ni/DEQFusion ``experiments/CMU-MOSI/model.py``, classes
``BertFinetuneInn``, ``DEQEQFusionModule``, ``SmallBlock``, ``DEQFusionBlock``).

The modalities are the text and audio self-similarity matrices A_t, A_a (B, L, L) of `CMBERTFusion`, each
read as an L-channel sequence of length L (row index = channel, so a 1x1 convolution mixes rows); the state
is z = [z_audio, z_text, z_fuse], three (B, L, L) matrices, zero at the start. One application of f:

    per modality (eq. 8, the code's SmallBlock):  z_i <- ReLU(Conv_2i(BN_i(Conv_1i(z_i) + x_i)))
    purify-then-combine (eqs. 9-11, DEQFusionBlock), with the freshly updated z_i:
        alpha_i = G(z_i + z_fuse);   z'_i = alpha_i * z_fuse                     (G: one Conv1x1, shared)
        z_fuse <- GroupNorm(1, L)(ReLU(Conv_f(sum_i z'_i) + x_fuse))
    injection (eq. 12): x_i = A_i,  x_fuse = w_t A_t + w_a A_a + b       (CM-BERT's weighted sum)

All convolutions are Conv1d(L, L, 1) with bias; BN_i is BatchNorm1d(L). The equilibrium z_fuse* replaces the
weighted sum before masking and softmax (`CMBERTFusion.scores`); everything after is CM-BERT's. Unlike the
generic DEQ layer (`fusionbench.fusion.deq.DEQFusion`) the per-modality block has no residual and no
GroupNorm, the gate no sigmoid, and the injection no normalisation, as in the code.

Solver: torchdeq Anderson (m 6, lambda 1e-4) forward under no_grad with the code's 'abs' stop at 1e-3 and
105 iterations; backward by implicit differentiation (Theorem 1: the adjoint fixed point, Anderson, 106
iterations, the code's 'rel' stop at 1e-3), checked per sample with the phantom gradient as fallback
(`fusionbench.fusion.deq.solve`); ``grad="phantom"`` uses the phantom gradient throughout. The code measures
the residual over the whole batch at once (``residual_norm="batch"``); the default here is torchdeq's
per-sample norm, stopping when every sample is within ``f_tol``. Jacobian regularisation: Hutchinson estimate
of ||J_f(z*)||_F^2 / numel with 2 vectors, on the same application f(z*) that carries the gradient (as the
code), added to ``aux_loss`` in training only. Weight: the code's loss is 0.5 (y - t)^2 + 0.01 jac,
fusionbench minimises the mean (y - t)^2, so the same objective (up to the factor 2, which Adam ignores) is
``jac_weight=0.02``, the default.

At initialisation the code's layer is not a contraction: with a tiny random BERT at L = 50 the Jacobian's
spectral radius is about 2-3 (the text block: its injection A_t is small after CM-BERT's batch-norm scaling,
and training-mode BN is scale-invariant), so the first forward solves stop at relative residuals of 0.1-0.3;
in a CPU probe (random data, the recipe's learning rates) the Jacobian penalty brought them to ~3e-3 within
5 steps while the spectral radius stayed near 2, and the adjoint solve then failed its check at nearly every
step, i.e. training ran on the phantom gradient. The code uses its adjoint Anderson result unchecked (the
lowest-residual iterate); ``b_failure_tol=1e9`` does the same here (only non-finite results fall back).

Batch normalisation inside the fixed-point iteration (``bn_stats``): in training mode BN normalises with the
batch statistics of its input at the current iterate, so every application of f is a function of the whole
batch, and the equilibrium and its implicit gradient are those of that batch function. Its running statistics
(used in evaluation) follow ``bn_stats``:
- ``every_call`` (the code): every training-mode application updates them: each solver iteration (up to 105),
  the application that carries the gradient, and the adjoint solve's re-evaluation. With momentum 0.1 the
  running statistics after a training step are, to within 0.9^k, those of the last k iterates of the last
  batch, i.e. of that one batch near its equilibrium; they do not average over batches.
- ``once``: solver, gradient and adjoint applications leave them alone; after each training solve they take
  one momentum step towards BN's input statistics at the equilibrium, i.e. BatchNorm's usual once-per-batch
  running average of the statistics at z*.
Under Pro-Fusion each unroll step keeps its own running statistics (the wrapper swaps the buffers).

Ablations of Table 7 (same names and meanings as `DEQFusion`): ``use_f_theta=False`` sets z_i = x_i;
``use_f_fuse=False`` sets z_fuse = w_t z_text + w_a z_audio + b (the weighted sum, so no gate);
``recursion=False`` applies f once from z = 0; ``use_gate=False`` sets z'_i = z_i. Where f does not read its
state (no f_theta and no gated f_fuse) one application is the exact equilibrium and no solver runs; with all
four off the model is CM-BERT (Table 7's first row).

Logged per batch in ``info``: ``deq/nstep``, ``deq/abs_residual``, ``deq/rel_residual`` (the solver's lowest
absolute and relative residual ||f(z) - z||, ||f(z) - z|| / ||f(z)||, batch means), ``deq/converged`` (share
of samples within ``f_tol`` in the ``f_stop_mode`` residual), ``deq/f_failed`` (share whose *relative*
residual stays above ``failure_tol``; judged on the relative residual because the 'abs' stop residual scales
with L), ``deq/jac_loss``, and CM-BERT's ``cmbert/w_t``, ``cmbert/w_a``, ``cmbert/b``. The model also keeps
`DEQFusion`'s ``forward_stats``/``backward_stats`` (`SolveStats`) and ``trace()`` (Table 8, Figure 3), but
`fusionbench.fusion.deq.callbacks.DEQMonitor` and ``deq_diagnostics`` select their models with
``isinstance(m, DEQFusion)`` and so skip this one until they select by those attributes.

Parameters (all under ``model.fusion``, the code's ``BertFinetun``): CM-BERT's plus ``fusion.deq.blocks.
{audio,text}.{conv1,norm,conv2}``, ``fusion.deq.gate``, ``fusion.deq.fuse``, ``fusion.deq.norm``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torchdeq.loss import jac_reg
from torchdeq.solver import get_solver

from fusionbench.errors import ConfigError, check_choices
from fusionbench.fusion.cmbert import MODALITIES, CMBERTFusion, Conv1x1
from fusionbench.fusion.deq.model import SOLVERS  # importing it also registers the "<solver>_global" solvers
from fusionbench.fusion.deq.solve import SolveStats, count_failure, implicit, phantom

BN_STATS = ("every_call", "once")


class ModalityBlock(nn.Module):
    """f_theta_i of the code (``SmallBlock``): ReLU(Conv_2(BN(Conv_1(z) + x))) on (B, L, L)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = Conv1x1(channels, channels)
        self.norm = nn.BatchNorm1d(channels)
        self.conv2 = Conv1x1(channels, channels)

    def pre_norm(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(z) + x

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(self.norm(self.pre_norm(z, x))))


class MatrixDEQLayer(nn.Module):
    """One application of the fusion layer on the state (B, 3, L, L) = [z_audio, z_text, z_fuse]."""

    def __init__(self, channels: int, use_f_theta: bool, use_f_fuse: bool, use_gate: bool) -> None:
        super().__init__()
        self.use_f_theta, self.use_f_fuse, self.use_gate = use_f_theta, use_f_fuse, use_gate
        if use_f_theta:
            self.blocks = nn.ModuleDict({m: ModalityBlock(channels) for m in MODALITIES})
        if use_f_fuse:  # the code's DEQFusionBlock (its dropouts are built with p = 0: left out)
            self.gate = Conv1x1(channels, channels) if use_gate else None
            self.fuse = Conv1x1(channels, channels)
            self.norm = nn.GroupNorm(1, channels)

    def f_theta(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Eq. 8 for both modalities; z, x: (B, 2, L, L) in the order of `MODALITIES`."""
        if not self.use_f_theta:
            return x
        return torch.stack([self.blocks[m](z[:, i], x[:, i]) for i, m in enumerate(MODALITIES)], dim=1)

    def alpha(self, z_fuse: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Eq. 9: the gate G(z_i + z_fuse) for both modalities, (B, 2, L, L)."""
        return torch.stack([self.gate(z[:, i] + z_fuse) for i in range(z.shape[1])], dim=1)

    def f_fuse(
        self, z_fuse: torch.Tensor, z: torch.Tensor, x_fuse: torch.Tensor, weighted: Callable
    ) -> torch.Tensor:
        """Eqs. 10-11 with the freshly updated z; ``weighted(z_text, z_audio)`` is CM-BERT's weighted sum."""
        if not self.use_f_fuse:
            return weighted(z[:, MODALITIES.index("text")], z[:, MODALITIES.index("audio")])
        purified = self.alpha(z_fuse, z) * z_fuse.unsqueeze(1) if self.use_gate else z
        return self.norm(torch.relu(self.fuse(purified.sum(1)) + x_fuse))

    def forward(self, state: torch.Tensor, x: torch.Tensor, x_fuse: torch.Tensor, weighted: Callable):
        z_new = self.f_theta(state[:, :-1], x)
        return torch.cat([z_new, self.f_fuse(state[:, -1], z_new, x_fuse, weighted).unsqueeze(1)], dim=1)

    def norms(self) -> list[nn.BatchNorm1d]:
        return [b.norm for b in self.blocks.values()] if self.use_f_theta else []

    @contextmanager
    def frozen_statistics(self) -> Iterator[None]:
        """Training-mode BN still normalises with batch statistics but leaves its running ones alone."""
        norms = [bn for bn in self.norms() if bn.track_running_stats]
        for bn in norms:  # training mode without tracking: batch statistics, buffers and counter untouched
            bn.track_running_stats = False
        try:
            yield
        finally:
            for bn in norms:
                bn.track_running_stats = True

    @torch.no_grad()
    def update_statistics(self, state: torch.Tensor, x: torch.Tensor) -> None:
        """One momentum step of each BN's running statistics towards its input statistics at ``state``."""
        if self.use_f_theta:
            for i, m in enumerate(MODALITIES):
                block = self.blocks[m]
                block.norm(block.pre_norm(state[:, i], x[:, i]))


class CMBERTDEQFusion(CMBERTFusion):
    """Args:
    encoders, num_outputs, proj_dim, attention_dropout, dropout, text_scale, freeze_head, head_init_std:
        see `CMBERTFusion`.
    seq_len: L, the token positions (``dataset.max_seq_len``, 50): the channels of every 1x1 convolution.
    use_f_theta, use_f_fuse, recursion, use_gate: the ablation switches of Table 7 (module docstring).
    bn_stats: ``every_call`` (code) or ``once`` (module docstring).
    f_solver, b_solver: ``anderson`` (code), ``broyden`` or ``fixed_point_iter`` (forward / backward).
    f_max_iter, b_max_iter: iteration caps (the code's MOSI script: 105 / 106).
    f_tol, b_tol, f_stop_mode, b_stop_mode: stopping rule of each solve (code: 1e-3 abs / 1e-3 rel).
    residual_norm: ``sample`` (torchdeq's per-sample norms) or ``batch`` (one norm over the batch, code).
    grad: ``ift`` (implicit, checked, phantom fallback) or ``phantom``.
    phantom_steps, phantom_tau: the phantom gradient's steps and damping (also the fallback's).
    jac_weight, jac_freq, jac_vecs: Jacobian regulariser weight in ``aux_loss`` (module docstring), the
        probability of computing it at a training step, and its random vectors.
    failure_tol: a forward solve whose relative residual stays above this has failed (counted, logged).
    b_failure_tol: an adjoint solve whose residual exceeds this x ||dL/dz*|| falls back to the phantom
        gradient.
    max_failures: consecutive training steps with a failed forward solve before training stops.
    """

    mode = "deq"  # read by `deq_diagnostics`, as for `DEQFusion`

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        num_outputs: int,
        seq_len: int = 50,
        use_f_theta: bool = True,
        use_f_fuse: bool = True,
        recursion: bool = True,
        use_gate: bool = True,
        bn_stats: str = "every_call",
        f_solver: str = "anderson",
        b_solver: str = "anderson",
        f_max_iter: int = 105,
        b_max_iter: int = 106,
        f_tol: float = 1e-3,
        b_tol: float = 1e-3,
        f_stop_mode: str = "abs",
        b_stop_mode: str = "rel",
        residual_norm: str = "sample",
        grad: str = "ift",
        phantom_steps: int = 5,
        phantom_tau: float = 0.5,
        jac_weight: float = 0.02,
        jac_freq: float = 1.0,
        jac_vecs: int = 2,
        failure_tol: float = 0.1,
        b_failure_tol: float = 0.1,
        max_failures: int = 100,
        proj_dim: int = 30,
        attention_dropout: float = 0.3,
        dropout: float = 0.1,
        text_scale: str = "batch",
        freeze_head: bool = True,
        head_init_std: float = 0.02,
    ) -> None:
        super().__init__(
            encoders,
            num_outputs,
            proj_dim,
            attention_dropout,
            dropout,
            text_scale,
            freeze_head,
            head_init_std,
        )
        choices = {
            "bn_stats": (bn_stats, BN_STATS),
            "f_solver": (f_solver, SOLVERS),
            "b_solver": (b_solver, SOLVERS),
            "f_stop_mode": (f_stop_mode, ("rel", "abs")),
            "b_stop_mode": (b_stop_mode, ("rel", "abs")),
            "residual_norm": (residual_norm, ("sample", "batch")),
            "grad": (grad, ("ift", "phantom")),
        }
        check_choices("fusion", choices)
        if seq_len < 1 or jac_weight < 0 or not 0 <= jac_freq <= 1 or b_failure_tol <= 0:
            raise ConfigError(
                "fusion.seq_len must be >= 1, jac_weight >= 0, jac_freq in [0, 1] and b_failure_tol > 0; got "
                f"{seq_len}, {jac_weight}, {jac_freq}, {b_failure_tol}."
            )
        self.seq_len = int(seq_len)
        self.use_f_theta, self.use_f_fuse, self.recursion, self.use_gate = (
            use_f_theta,
            use_f_fuse,
            recursion,
            use_gate,
        )
        self.bn_stats = bn_stats
        self.fusion.deq = MatrixDEQLayer(self.seq_len, use_f_theta, use_f_fuse, use_gate)
        suffix = "_global" if residual_norm == "batch" else ""
        self.f_solver, self.b_solver = f_solver + suffix, b_solver + suffix
        self.global_residual = residual_norm == "batch"
        self.f_max_iter, self.b_max_iter, self.f_tol, self.b_tol = f_max_iter, b_max_iter, f_tol, b_tol
        self.f_stop_mode, self.b_stop_mode, self.grad = f_stop_mode, b_stop_mode, grad
        self.phantom_steps, self.phantom_tau = phantom_steps, phantom_tau
        self.jac_weight, self.jac_freq, self.jac_vecs = jac_weight, jac_freq, jac_vecs
        self.failure_tol, self.b_failure_tol, self.max_failures = failure_tol, b_failure_tol, max_failures
        self.consecutive_failures = 0
        # the same bookkeeping as DEQFusion, for DEQMonitor-style callbacks
        self.backward_stats = SolveStats()
        self.forward_stats = {"train": SolveStats(), "eval": SolveStats()}

    # -- the layer ------------------------------------------------------------------------------------
    def injection(self, a_t: torch.Tensor, a_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 2, L, L) = [A_audio, A_text] and x_fuse = w_t A_t + w_a A_a + b (eq. 12)."""
        if a_t.shape[-1] != self.seq_len:
            raise ConfigError(
                f"The DEQ fusion layer was built for L = fusion.seq_len={self.seq_len} token positions, but "
                f"the batch has {a_t.shape[-1]}. Set `fusion.seq_len` to `dataset.max_seq_len`."
            )
        return torch.stack([a_a, a_t], dim=1), self.fusion.weighted(a_t, a_a)

    def layer(self, state: torch.Tensor, x: torch.Tensor, x_fuse: torch.Tensor) -> torch.Tensor:
        """One application of f on the state (B, 3, L, L)."""
        return self.fusion.deq(state, x, x_fuse, self.fusion.weighted)

    def reads_state(self) -> bool:
        """Whether f depends on z at all (else one application from zero is the equilibrium)."""
        return self.use_f_theta or (self.use_f_fuse and self.use_gate)

    def scores(self, a_t: torch.Tensor, a_a: torch.Tensor):
        x, x_fuse = self.injection(a_t, a_a)
        state, aux, info = self.equilibrium(x, x_fuse)
        return state[:, -1], aux, info

    def equilibrium(
        self, x: torch.Tensor, x_fuse: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """(z* (B, 3, L, L), aux_loss, info): the fixed point with its gradient attached in training, or one
        application from zero (``recursion=False``, or f independent of z)."""
        state0 = x.new_zeros(x.shape[0], 3, *x.shape[2:])
        if not self.recursion or not self.reads_state():
            return self.layer(state0, x, x_fuse), None, {}
        deq = self.fusion.deq
        once = self.bn_stats == "once"

        def func(s: torch.Tensor) -> torch.Tensor:
            if not once:
                return self.layer(s, x, x_fuse)
            with deq.frozen_statistics():
                return self.layer(s, x, x_fuse)

        with torch.no_grad():
            z, _, stats = get_solver(self.f_solver)(
                func, state0, max_iter=self.f_max_iter, tol=self.f_tol, stop_mode=self.f_stop_mode
            )
        info = self._solver_info(stats)
        training = self.training and torch.is_grad_enabled()
        if not training:
            return z, None, info
        z = z.detach()
        if once:
            deq.update_statistics(z, x)
        jac = self.jac_weight > 0 and random.random() < self.jac_freq
        aux, z_next = None, None
        if jac or self.grad == "ift":
            z = z.requires_grad_(jac)
            z_next = func(z)  # the application that carries dL/dtheta and the Jacobian term, as in the code
        if jac:
            aux = self.jac_weight * jac_reg(z_next, z, vecs=self.jac_vecs)
            info["deq/jac_loss"] = aux.detach() / self.jac_weight
        if self.grad == "phantom":
            return phantom(z.detach(), func, self.phantom_steps, self.phantom_tau), aux, info
        solver = get_solver(self.b_solver)
        b_opts = dict(max_iter=self.b_max_iter, tol=self.b_tol, stop_mode=self.b_stop_mode)
        z_star = implicit(
            z_next,
            func,
            lambda g_f, g0: solver(g_f, g0, **b_opts)[0],
            self.backward_stats,
            fail_tol=self.b_failure_tol,
            steps=self.phantom_steps,
            tau=self.phantom_tau,
            sync_free=False,
            batch_global=self.global_residual,
        )
        return z_star, aux, info

    def _solver_info(self, stats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-batch means of the solver statistics; counts failures (relative residual above
        ``failure_tol`` or not finite) and stops training after ``max_failures`` failed steps in a row."""
        rel = stats["rel_lowest"].detach()
        stop = stats[f"{self.f_stop_mode}_lowest"].detach()
        failed = ~(rel <= self.failure_tol)  # NaN compares False: a NaN solve has failed
        self.forward_stats["train" if self.training else "eval"].add(failed, rel)
        if self.training:
            why = f"relative residual {float(rel.max()):.3g} > fusion.failure_tol={self.failure_tol:.3g}"
            count_failure(
                self,
                failed,
                f"The CM-BERT DEQ fusion solver failed to converge on {{n}} consecutive training steps "
                f"({why}). Try more iterations (fusion.f_max_iter), a larger fusion.jac_weight, or a lower "
                "learning rate for the fusion group.",
            )
        return {
            "deq/nstep": stats["nstep"].float().mean(),
            "deq/abs_residual": stats["abs_lowest"].detach().mean(),
            "deq/rel_residual": rel.mean(),
            "deq/converged": (stop <= self.f_tol).float().mean(),
            "deq/f_failed": failed.float().mean(),
        }

    # -- diagnostics (Table 8, Figure 3) ----------------------------------------------------------------
    @torch.no_grad()
    def trace(self, embeddings: Mapping[str, torch.Tensor], steps: int = 100) -> dict[str, list]:
        """`DEQFusion.trace` for this layer on encoder outputs {text: (B, L, h), audio: (B, L, d)}:
        ``iteration_rel_diff`` (||z_fuse^[j+1] - z_fuse^[j]|| / ||z_fuse^[j]|| under plain iteration from
        zero), ``gate_share`` (mean |alpha_m| normalised over the modalities, Figure 3) and
        ``solver_rel_residual`` (the forward solver's relative residual per step, early stopping off).
        Run it in eval mode: in training mode every step would also move the BN running statistics."""
        x, x_fuse = self.injection(*self.attention_logits(embeddings["text"], embeddings["audio"]))
        state = x.new_zeros(x.shape[0], 3, *x.shape[2:])
        rel, gates = [], []
        for _ in range(steps + 1):
            new = self.layer(state, x, x_fuse)
            if self.use_f_fuse and self.use_gate:
                a = self.fusion.deq.alpha(state[:, -1], new[:, :-1]).abs().mean(dim=(0, 2, 3))
                gates.append((a / a.sum()).tolist())
            diff = (new[:, -1] - state[:, -1]).flatten(1).norm(dim=1)
            rel.append((diff / (state[:, -1].flatten(1).norm(dim=1) + 1e-9)).mean().item())
            state = new
        out: dict = {"iteration_rel_diff": rel[1:]}  # step 0 divides by the zero initial state
        if gates:
            out["gate_share"] = {m: [g[i] for g in gates[1:]] for i, m in enumerate(MODALITIES)}
        if self.recursion and self.reads_state():
            solver = get_solver(self.f_solver.removesuffix("_global"))
            func = lambda s: self.layer(s, x, x_fuse)  # noqa: E731
            _, _, info = solver(func, torch.zeros_like(state), max_iter=steps + 1, tol=0.0, stop_mode="rel")
            means = [float(t.mean()) for t in info["rel_trace"].reshape(len(state), -1).T][:steps]
            out["solver_rel_residual"] = [v if v < 1e6 else None for v in means]  # 1e8: steps not reached
        return out
