"""CUDA graphs of the fixed-iteration solves of `DEQFusion` (``cuda_graph=True``, the GPU fast path).

A training step of DEQ fusion is launch-bound: 30 Anderson steps forward and 31 backward are thousands of
kernels on tensors of a few hundred kilobytes, so the GPU waits on the Python loop that launches them. With
``fixed_iterations=True`` both solves have static shapes and no host synchronisation (`anderson_fixed`,
`adjoint` with ``sync_free``), so each is captured once per (batch size, dtype, iterations) as a
`torch.cuda.CUDAGraph` and replayed: one launch instead of thousands.

What a replay reads: the layer's parameters in place (optimisers update them in place, so a graph always sees
the current weights; `DEQFusion._apply`, i.e. ``.to()``/``.half()``, drops the graphs), and static copies of
the injected features x, x_fuse, the dropout mask, and for the backward graph z* and dL/dz*. The eager
fixed-iteration path computes the same arithmetic and stays the reference (CPU, ``cuda_graph=False``); tests
marked ``gpu`` check that both give the same fixed point, gradients and solver statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fusionbench.fusion.deq.solve import adjoint, anderson_fixed

Layer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class _Captured:
    """One graph with its static inputs (copied into before a replay) and outputs (read after)."""

    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    outputs: tuple[torch.Tensor, ...]

    def replay(self, **values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for name, value in values.items():
            self.inputs[name].copy_(value)
        self.graph.replay()
        return self.outputs


@dataclass
class SolveGraphs:
    """The captured forward and backward solves of one layer, keyed by their static shapes.

    ``layer(state, x, x_fuse)`` is one application of f; ``swap_mask(mask)`` points the layer at the dropout
    mask it should read (a static buffer while capturing) and returns the one it read before.
    """

    layer: Layer
    swap_mask: Callable[[torch.Tensor | None], torch.Tensor | None]
    warmup: int = 2
    graphs: dict[tuple, _Captured] = field(default_factory=dict)

    def clear(self) -> None:
        self.graphs.clear()

    def forward(
        self, x: torch.Tensor, x_fuse: torch.Tensor, mask: torch.Tensor | None, state_shape: tuple, iters: int
    ):
        """``anderson_fixed`` from zeros: ``(z*, abs_residual, rel_residual)``, fresh tensors (not the
        graph's)."""
        key = (
            "forward",
            tuple(x.shape),
            x.dtype,
            x.device,
            mask is not None,
            iters,
            torch.is_autocast_enabled(),
        )
        if key not in self.graphs:
            inputs = {"x": x.detach().clone(), "x_fuse": x_fuse.detach().clone()}
            if mask is not None:
                inputs["mask"] = mask.clone()

            def run() -> tuple[torch.Tensor, ...]:
                # every tensor a graph reads must outlive it: the initial state is made inside the capture,
                # not closed over (a local freed after capture would be replayed from reused memory)
                with torch.no_grad():
                    zeros = inputs["x"].new_zeros(state_shape)
                    return anderson_fixed(
                        lambda s: self.layer(s, inputs["x"], inputs["x_fuse"]), zeros, iters
                    )

            self.graphs[key] = self._capture(run, inputs, inputs.get("mask"))
        values = {"x": x.detach(), "x_fuse": x_fuse.detach(), **({"mask": mask} if mask is not None else {})}
        return tuple(t.clone() for t in self.graphs[key].replay(**values))

    def backward(
        self,
        x: torch.Tensor,
        x_fuse: torch.Tensor,
        mask: torch.Tensor | None,
        z: torch.Tensor,
        iters: int,
        **adjoint_opts,
    ) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]:
        """``solve_adjoint(z, grad)``: `adjoint` with ``iters`` fixed Anderson steps,
        ``(g, failed, residual)``.

        Called in the forward pass, so that a missing graph is captured there rather than inside autograd's
        backward; the returned function replays it with this step's x, x_fuse and mask.
        """
        key = (
            "backward",
            tuple(z.shape),
            z.dtype,
            z.device,
            mask is not None,
            iters,
            torch.is_autocast_enabled(),
            tuple(sorted(adjoint_opts.items())),
        )
        if key not in self.graphs:
            inputs = {
                "x": x.detach().clone(),
                "x_fuse": x_fuse.detach().clone(),
                "z": z.detach().clone(),
                "grad": torch.zeros_like(z),
            }
            if mask is not None:
                inputs["mask"] = mask.clone()
            solve = lambda g_f, g0: anderson_fixed(g_f, g0, iters)[0]  # noqa: E731

            def run() -> tuple[torch.Tensor, ...]:
                func = lambda s: self.layer(s, inputs["x"], inputs["x_fuse"])  # noqa: E731
                return adjoint(func, inputs["z"], inputs["grad"], solve, sync_free=True, **adjoint_opts)

            self.graphs[key] = self._capture(run, inputs, inputs.get("mask"))
        captured = self.graphs[key]
        values = {"x": x.detach(), "x_fuse": x_fuse.detach(), **({"mask": mask} if mask is not None else {})}

        def solve_adjoint(z: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(t.clone() for t in captured.replay(z=z, grad=grad, **values))

        return solve_adjoint

    def _capture(
        self, run: Callable[[], tuple[torch.Tensor, ...]], inputs: dict, mask: torch.Tensor | None
    ) -> _Captured:
        """Warm ``run`` up on a side stream (lazy cuBLAS/allocator set-up must not happen during capture),
        then capture it."""
        previous = self.swap_mask(mask)
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(self.warmup):
                    run()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = run()
        finally:
            self.swap_mask(previous)
        return _Captured(graph, inputs, tuple(outputs))
