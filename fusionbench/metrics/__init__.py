"""Metric collections per task type (and, later, paper-specific metrics and compute counters)."""

from fusionbench.metrics.collections import make_metrics, prepare_for_metrics

__all__ = ["make_metrics", "prepare_for_metrics"]
