"""MM-Dynamics (Han et al., "Multimodal Dynamics", CVPR 2022), the BRCA base model of DEQ fusion
Table 1, with a pluggable fusion of its confidence-weighted features.

Per view v (raw features x_v):
    feature informativeness   g_v = sigmoid(F_v x_v),  x_v <- g_v * x_v
    encoder                   h_v = encoder_v(x_v)          (Linear -> ReLU -> Dropout in the paper)
    true-class probability    logits_v = C_v h_v,  c_v = T_v h_v,  h_v <- c_v * h_v
then ``fusion`` combines {h_v}: concatenation + Linear for MM-Dynamics itself, DEQ fusion for
"MM-Dynamics + DEQ Fusion". Training adds, for every view, mean(g_v) (sparsity of the
informativeness gate), MSE(c_v, p_v[y]) (confidence regresses the softmax probability of the true
class) and CE(logits_v, y) to the cross-entropy of the fused prediction.

``view_loss_recursion`` r adds the view terms recursively, L <- r L + terms_v for v = 1..N starting
from the fused cross-entropy. MM-Dynamics uses r = 1 (a plain sum); the public DEQ-fusion copy of
this code uses r = 1.5 (fused CE x 1.5^3 for three views), an undocumented change behind the
reported "+ DEQ" numbers, so ``fusion=mmdynamics_deq`` sets 1.5.
All Linear layers start Xavier-normal with zero bias, as in MM-Dynamics.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fusionbench.encoders.identity import IdentityEncoder
from fusionbench.errors import ConfigError
from fusionbench.fusion.base import EncoderFusion, FusionOutput, FusionStep, as_module_dict
from fusionbench.fusion.deq.model import set_dropout


def _xavier(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)


class MMDynamics(nn.Module):
    """Args:
    encoders: one encoder per view, each reporting ``input_dim`` and ``output_dim``.
    num_outputs: number of classes.
    fusion: partial fusion model, called with identity encoders of the views' hidden widths and
        ``num_outputs`` (e.g. `ConcatFusion` or `DEQFusion`).
    view_loss_recursion: r of the loss recursion (module docstring).
    """

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        num_outputs: int,
        fusion: Callable[..., EncoderFusion],
        view_loss_recursion: float = 1.0,
    ) -> None:
        super().__init__()
        self.encoders = as_module_dict(encoders)
        self.modalities = sorted(self.encoders)
        self.view_loss_recursion = view_loss_recursion
        missing = [m for m in self.modalities if not hasattr(self.encoders[m], "input_dim")]
        if missing:
            raise ConfigError(
                f"MM-Dynamics gates raw features and needs encoders reporting `input_dim`; {missing} do not."
            )
        dims = {m: int(self.encoders[m].input_dim) for m in self.modalities}
        hidden = {m: int(self.encoders[m].output_dim) for m in self.modalities}
        self.informativeness = nn.ModuleDict({m: nn.Linear(dims[m], dims[m]) for m in self.modalities})
        self.tcp_classifier = nn.ModuleDict({m: nn.Linear(hidden[m], num_outputs) for m in self.modalities})
        self.tcp_confidence = nn.ModuleDict({m: nn.Linear(hidden[m], 1) for m in self.modalities})
        _xavier(self)
        self.fusion = fusion(
            encoders=nn.ModuleDict({m: IdentityEncoder(hidden[m]) for m in self.modalities}),
            num_outputs=num_outputs,
        )
        # a fusion that sets the dropout of the encoders feeding it (DEQ fusion's encoder_dropout)
        # means these view encoders
        set_dropout(self.encoders, getattr(self.fusion, "encoder_dropout", None))
        _xavier(self.fusion.head)

    def features(
        self, inputs: Mapping[str, torch.Tensor], context: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[dict[str, torch.Tensor], dict]:
        """The confidence-weighted view features that enter the fusion, and what the losses need."""
        context = context or {}
        features, extras = {}, {"gate": {}, "tcp_logits": {}, "confidence": {}}
        for m in self.modalities:
            if m not in inputs:
                raise ConfigError(
                    f"The batch has modalities {sorted(inputs)}; MM-Dynamics needs {self.modalities}."
                )
            x = inputs[m].flatten(1)
            gate = torch.sigmoid(self.informativeness[m](x))
            h = self.encoders[m](gate * x, context.get(m))
            conf = self.tcp_confidence[m](h)
            extras["gate"][m], extras["tcp_logits"][m], extras["confidence"][m] = (
                gate,
                self.tcp_classifier[m](h),
                conf,
            )
            features[m] = h * conf
        return features, extras

    @property
    def fused_dim(self) -> int:
        return self.fusion.fused_dim

    def step(
        self, inputs: Mapping[str, torch.Tensor], context: Mapping[str, torch.Tensor] | None = None
    ) -> FusionStep:
        features, extras = self.features(inputs, context)
        fused, aux, info = self.fusion.combine(features)
        info = {
            **info,
            **{f"mmd/confidence_{m}": extras["confidence"][m].detach().mean() for m in self.modalities},
        }
        return FusionStep(fused, aux, info, features, extras)

    def predict(self, step: FusionStep) -> FusionOutput:
        return FusionOutput(self.fusion.head(step.fused), step.aux_loss, step.info, step.extras)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> FusionOutput:
        return self.predict(self.step(inputs))

    def target_loss(self, out: FusionOutput, target: torch.Tensor) -> torch.Tensor:
        """Everything the task's fused cross-entropy does not cover (needs the labels, so the task calls
        it): the per-view terms, and with r != 1 the extra weight (r^N - 1) of the fused CE."""
        r = self.view_loss_recursion
        fused_ce = F.cross_entropy(out.logits, target.long())
        loss = out.logits.new_zeros(())
        for m in self.modalities:
            logits = out.extras["tcp_logits"][m]
            p_true = F.softmax(logits, dim=1).gather(1, target.long().unsqueeze(1)).squeeze(1)
            terms = out.extras["gate"][m].mean() + F.mse_loss(out.extras["confidence"][m].squeeze(1), p_true)
            loss = r * loss + terms + F.cross_entropy(logits, target.long())
        return loss + (r ** len(self.modalities) - 1) * fused_ce
