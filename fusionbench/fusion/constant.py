"""Constant prediction: the reference every sentiment (or any) model must beat.

The output is one learned vector b (``num_outputs``), the same for every sample; the inputs are not read and
the encoders are dropped. Trained with MSE, b converges to the training targets' mean (with L1, to their
median), so its test metrics are what "predict the training prior" scores: on CMU-MOSI, with most test
labels negative, such a predictor has ``acc2`` equal to the share of the sign it lands on.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fusionbench.fusion.base import FusionOutput


class ConstantFusion(nn.Module):
    """Args:
    encoders: ignored (the backbone's encoders are not kept, so the parameter count is the constant's).
    num_outputs: outputs per sample.
    init: the constant's starting value.
    """

    def __init__(self, encoders: Mapping[str, nn.Module], num_outputs: int, init: float = 0.0) -> None:
        super().__init__()
        del encoders
        self.encoders = nn.ModuleDict()
        self.bias = nn.Parameter(torch.full((int(num_outputs),), float(init)))

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> FusionOutput:
        batch = next(iter(inputs.values())).shape[0]
        # a copy, not a view: a view of a parameter made under no_grad requires grad without a grad_fn, which
        # torch's module tracker (MAdds counting) rejects
        return FusionOutput(self.bias.repeat(batch, 1), None, {})
