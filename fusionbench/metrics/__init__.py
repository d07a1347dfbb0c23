"""Metric collections per task type (and, later, paper-specific metrics and compute counters)."""

from fusionbench.metrics.collections import make_metrics, prepare_for_metrics
from fusionbench.metrics.segmentation import per_class_iou

__all__ = ["make_metrics", "per_class_iou", "prepare_for_metrics"]
