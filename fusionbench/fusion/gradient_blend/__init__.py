"""Gradient blending (Wang et al. 2020): the multi-head model (`model`) and the callback that measures the
heads' overfitting and sets their weights during training (`callback`)."""

from fusionbench.fusion.gradient_blend.callback import GradientBlendCallback
from fusionbench.fusion.gradient_blend.model import FORMS, GradientBlendFusion, blend_weights_from_losses

__all__ = ["FORMS", "GradientBlendCallback", "GradientBlendFusion", "blend_weights_from_losses"]
