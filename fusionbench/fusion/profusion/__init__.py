"""Progressive fusion: the unrolled wrapper with backprojected context (`model`) and the linear probes of its
unimodal representations per unroll step (`probe`, Figure 13)."""

from fusionbench.fusion.profusion.model import ProFusion, build_base
from fusionbench.fusion.profusion.probe import linear_probe, probe_accuracy

__all__ = ["ProFusion", "build_base", "linear_probe", "probe_accuracy"]
