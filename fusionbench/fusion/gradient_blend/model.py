"""Gradient Blending (GB; Wang, Tran & Feiszli 2020, "What Makes Training Multi-Modal Classification
Networks Hard?") on a late-fusion model, as MultiBench's AV-MNIST example sizes it:

    fused head  MLP(240, 100, 10) on [z_audio; z_image]        uni heads  MLP(48, 100, 10), MLP(192, 100, 10)
    L = w_fused * L(fused) + sum_m w_m * L(uni_m)                        (paper eq. 7 / Algorithm 1)
    w_k = (1/Z) * ΔG_k / ΔO_k^2                                          (paper Proposition 1, OGR)

with, over the last ``gb_epoch`` epochs (n -> n + N), ΔG_k = L^V_k(n) - L^V_k(n+N) (the gain in
held-out loss) and ΔO_k = O_k(n+N) - O_k(n), O = L^V - L^T (the overfitting gap); Z normalises the
weights to sum 1.

Division of work inside fusionbench: this model holds the weights as a buffer (so they are saved in
checkpoints) and adds, through ``target_loss(output, target)`` (which `FusionTask` adds to its own
unit-weight loss on the fused logits), ``(w_fused - 1) * L(fused) + sum_m w_m * L(uni_m)``; the total is
exactly the blended loss above. The weights are re-estimated every ``gb_epoch`` epochs by
`fusionbench.fusion.gradient_blend.GradientBlendCallback` from the live model's train and held-out losses of
every head (`blend_weights_from_losses`). Differences from MultiBench's ``gradient_blend.train``, which
re-estimates each round by training throw-away copies of the unimodal and multimodal networks for
``gb_epoch`` epochs on 92% of train and measures on the other 8%, and fine-tunes a copy of the fused head
for 25 epochs per round: the estimate here uses the model's own trajectory, the held-out data is the
validation split (documented in the callback), and there is no head fine-tuning. Until the first
estimate the weights are ``init_weights`` (default uniform).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fusionbench.errors import ConfigError
from fusionbench.fusion.base import EncoderFusion, FusionOutput, FusionStep, mlp_head
from fusionbench.task import task_loss

FORMS = ("delta", "multibench")
FUSED = "fused"


def blend_weights_from_losses(
    before: Mapping[str, tuple[float, float]] | None,
    after: Mapping[str, tuple[float, float]],
    form: str = "delta",
    min_overfit: float = 1e-4,
) -> dict[str, float] | None:
    """Normalised GB weights from ``{head: (train_loss, heldout_loss)}`` at the start (``before``) and
    the end (``after``) of an estimation window; None when no head earned a positive weight.

    ``delta`` (the paper): w ∝ max(ΔG, 0) / max(|ΔO|, min_overfit)^2. ``multibench`` (MultiBench's
    default ``delta=False``): w ∝ L^V / max(O, min_overfit)^2 from ``after`` alone.
    """
    if form not in FORMS:
        raise ConfigError(f"Gradient blending form must be one of {FORMS}, got {form!r}.")
    raw = {}
    for head, (train_after, val_after) in after.items():
        gap_after = val_after - train_after
        if form == "multibench":
            raw[head] = abs(val_after) / max(gap_after, min_overfit) ** 2
            continue
        if before is None or head not in before:
            raise ConfigError(
                "The 'delta' gradient-blending estimate needs the losses at the start of the window."
            )
        train_before, val_before = before[head]
        gain = val_before - val_after
        d_overfit = gap_after - (val_before - train_before)
        raw[head] = max(gain, 0.0) / max(abs(d_overfit), min_overfit) ** 2
    total = sum(raw.values())
    if not total > 0 or total == float("inf"):
        return None
    return {head: w / total for head, w in raw.items()}


class GradientBlendFusion(EncoderFusion):
    """Args:
    encoders: one encoder per modality.
    num_outputs: classes / targets.
    uni_head_hidden: hidden widths of every unimodal head ([100]).
    uni_head_dropout: dropout inside the unimodal heads.
    init_weights: ``{modality: w, ..., fused: w}`` used until the first estimate (normalised);
        None: uniform.
    task_type: loss of every head, as the task's (``multiclass``, ``multilabel``, ``regression``).
    head_hidden: hidden widths of the fused head ([100]).
    head_dropout: dropout inside the fused head.
    """

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        num_outputs: int,
        uni_head_hidden: Sequence[int] = (100,),
        uni_head_dropout: float = 0.0,
        init_weights: Mapping[str, float] | None = None,
        task_type: str = "multiclass",
        head_hidden: Sequence[int] = (100,),
        head_dropout: float = 0.0,
    ) -> None:
        super().__init__(encoders, num_outputs, head_hidden=head_hidden, head_dropout=head_dropout)
        if task_type not in ("multiclass", "multilabel", "regression"):
            raise ConfigError(
                f"fusion.task_type must be multiclass, multilabel or regression, got {task_type!r}."
            )
        self.task_type = task_type
        self.fused_dim = sum(self.embed_dims.values())
        self.uni_heads = nn.ModuleDict(
            {
                m: mlp_head(d, self.num_outputs, list(uni_head_hidden), uni_head_dropout)
                for m, d in self.embed_dims.items()
            }
        )
        self.heads = [*self.modalities, FUSED]
        self.register_buffer("blend_weights", torch.full((len(self.heads),), 1.0 / len(self.heads)))
        if init_weights is not None:
            self.set_blend_weights(init_weights)
        self.build_head()

    def set_blend_weights(self, weights: Mapping[str, float]) -> None:
        """Set (and normalise) the weights of ``modalities + [fused]``."""
        if sorted(weights) != sorted(self.heads):
            raise ConfigError(
                f"Gradient-blending weights must name exactly {self.heads}, got {sorted(weights)}."
            )
        values = torch.tensor([float(weights[h]) for h in self.heads])
        if (values < 0).any() or not values.sum() > 0:
            raise ConfigError(
                f"Gradient-blending weights must be >= 0 with a positive sum, got {dict(weights)}."
            )
        self.blend_weights.copy_(values / values.sum())

    def weight(self, head: str) -> torch.Tensor:
        return self.blend_weights[self.heads.index(head)]

    def fuse(self, embeddings: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([embeddings[m] for m in self.modalities], dim=-1)

    def combine(self, embeddings: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, None, dict]:
        return self.fuse(embeddings), None, {f"gb/w_{h}": self.weight(h) for h in self.heads}

    def predict(self, step: FusionStep) -> FusionOutput:
        uni = {m: self.uni_heads[m](step.embeddings[m]) for m in self.modalities}
        extras = {**(step.extras or {}), "uni_logits": uni}
        return FusionOutput(self.head(step.fused), step.aux_loss, step.info, extras)

    def head_losses(self, output: FusionOutput, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unweighted loss of every head, keyed like ``heads``."""
        losses = {
            m: task_loss(self.task_type, logits, target) for m, logits in output.extras["uni_logits"].items()
        }
        losses[FUSED] = task_loss(self.task_type, output.logits, target)
        return losses

    def target_loss(self, output: FusionOutput, target: torch.Tensor) -> torch.Tensor:
        """What the task must add to its unit-weight fused loss to get the blended loss."""
        losses = self.head_losses(output, target)
        extra = (self.weight(FUSED) - 1.0) * losses[FUSED]
        return extra + sum(self.weight(m) * losses[m] for m in self.modalities)
