"""Deep equilibrium fusion: the layer and its solves (`model`, `solve`, `graph`) and its callbacks
(`callbacks`, imported by Hydra from the default callback set, not here: they import `MMDynamics`, which
imports this package)."""

from fusionbench.fusion.deq.model import SOLVERS, BatchedGroupNorm, BatchedLinear, DEQFusion, set_dropout

__all__ = ["SOLVERS", "BatchedGroupNorm", "BatchedLinear", "DEQFusion", "set_dropout"]
