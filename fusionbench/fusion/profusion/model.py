"""Progressive Fusion (Shankar, Thompson & Fiterau, "Progressive Fusion for Multimodal Integration"):
backward connections from the fused vector into every unimodal encoder, unrolled for R steps.

Appendix, eqs. 7-9, with c_0 = 0:

    Ĝ_i(x_i, c_{t-1}) = G_i(x_i ⊕ W_i c_{t-1})                       (7)
    c_t = F(Ĝ_1(x_1, c_{t-1}), ..., Ĝ_K(x_K, c_{t-1})),  t = 1..R       (8)
    Ŷ = P(c_R)                                                       (9)

F is the base model's fusion layer and P its head: the wrapper takes *any* fusion model of the
project that exposes ``encoders``, ``fused_dim``, ``step`` and ``predict`` (`EncoderFusion`,
MM-Dynamics, DEQ fusion, ...). ``⊕`` is where the context joins encoder i: concatenated to its input
(``join_layer=0``, eq. 7 / the pseudo-code's ``G([x_i, W_i c])``) or to a later layer's input
(Figure 9a); see `fusionbench.encoders.context`. ``context_dim`` is the width of W_i c, the
"dimension of the backprojecting connection" of Figure 5.

Choices the paper leaves open, made explicit here:
- W_i is a bias-free linear map, so c_0 = 0 makes step 1 exactly the base model, and W = 0 makes the
  whole wrapper exactly the base model (the paper's requirement c = 0 ⇒ F̂(x, c) = F(x)).
- ``unroll_steps`` = R counts applications of the base model: R = 1 is the base model, R = 2 (the
  paper's setting for Table 5) feeds back once. Gradients flow through the whole unroll and the loss
  is on the final prediction, as in the appendix pseudo-code; the base's auxiliary loss (e.g. DEQ's
  Jacobian term, MFM's reconstruction) is taken from the last step.
- Batch normalisation inside the base model keeps separate running statistics per unroll step. In
  training each step normalises with its own batch statistics, and step 1 (no context) and step 2 (with
  context) see different activation distributions; one shared running average would mix them and make
  eval-mode predictions differ from what was trained (on AV-MNIST: 99% train, 23% test accuracy). Steps
  beyond the trained R (linear probes) reuse the last step's statistics.
- ``feedback="own"`` is the "Iterative" ablation of Table 5 (Figure 12): encoder i is fed back its
  own previous output instead of the fused vector, so no information crosses modalities.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from fusionbench.errors import ConfigError
from fusionbench.fusion.base import FusionOutput, FusionStep, as_module_dict
from fusionbench.fusion.configs import fusion_config

FEEDBACK = ("fused", "own")


def build_base(
    base: str | Mapping[str, Any] | Callable[..., nn.Module],
    encoders: Mapping[str, nn.Module],
    num_outputs: int,
    base_args: Mapping[str, Any] | None = None,
) -> nn.Module:
    """The wrapped model from a fusion config name (``concat``, ``lowrank``, ...), a config node with
    ``_target_``, or a callable (a Hydra ``_partial_`` node)."""
    if callable(base) and not isinstance(base, Mapping):
        if base_args:
            raise ConfigError(
                "fusion.base_args applies to a base given by name or config node, not to a partial."
            )
        return base(encoders=encoders, num_outputs=num_outputs)
    if isinstance(base, str):
        node = fusion_config(base, user="Pro-Fusion", exclude=("profusion",))
    elif isinstance(base, Mapping):
        node = OmegaConf.create(dict(base))
    else:
        raise ConfigError(f"fusion.base must be a fusion name or config node, got {type(base).__name__}.")
    node = OmegaConf.merge(node, OmegaConf.create(dict(base_args or {})))
    return instantiate(node, encoders=encoders, num_outputs=num_outputs, _convert_="all")


class ProFusion(nn.Module):
    """Args:
    encoders: one encoder per modality (`ContextEncoder`s: MLP, LeNet, identity, ...).
    num_outputs: classes / labels / targets, passed to the base model.
    base: the wrapped fusion: a config name under ``configs/fusion`` or a ``_partial_`` node.
    base_args: overrides merged into the base's config (e.g. ``{rank: 8}``).
    unroll_steps: R, applications of the base model (1 = the base model itself).
    context_dim: width of the back-projected context W_i c (Figure 5's backprojection dimension).
    join_layer: encoder layer the context joins (0 = with the input); an int for every encoder or
        a mapping ``{modality: layer}`` (Figure 9a).
    feedback: ``fused`` (Pro-Fusion) or ``own`` (the iterative ablation of Table 5).
    """

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        num_outputs: int,
        base: str | Mapping[str, Any] | Callable[..., nn.Module] = "concat",
        base_args: Mapping[str, Any] | None = None,
        unroll_steps: int = 2,
        context_dim: int = 64,
        join_layer: int | Mapping[str, int] = 0,
        feedback: str = "fused",
    ) -> None:
        super().__init__()
        if unroll_steps < 1:
            raise ConfigError(f"fusion.unroll_steps must be >= 1 (1 is the base model), got {unroll_steps}.")
        if feedback not in FEEDBACK:
            raise ConfigError(f"fusion.feedback must be one of {FEEDBACK}, got {feedback!r}.")
        if context_dim < 1:
            raise ConfigError(f"fusion.context_dim must be >= 1, got {context_dim}.")
        self.base = build_base(base, as_module_dict(encoders), num_outputs, base_args)
        missing = [a for a in ("encoders", "fused_dim", "step", "predict") if not hasattr(self.base, a)]
        if missing:
            raise ConfigError(
                f"Pro-Fusion wraps models that expose encoders, fused_dim, step() and predict(); "
                f"{type(self.base).__name__} lacks {missing}."
            )
        self.unroll_steps = int(unroll_steps)
        self.feedback = feedback
        self.context_dim = int(context_dim)
        # the encoders the base really runs (early fusion: 'joint'); with R = 1 nothing is fed back, so no
        # back-projection is built (parameters without gradient would also break DDP)
        targets = list(self.base.encoders.keys()) if self.unroll_steps > 1 else []
        layers = (
            dict(join_layer) if isinstance(join_layer, Mapping) else {m: int(join_layer) for m in targets}
        )
        unknown = sorted(set(layers) - set(self.base.encoders.keys()))
        if unknown:
            raise ConfigError(
                f"fusion.join_layer names {unknown}, but the base model's encoders are "
                f"{list(self.base.encoders)}."
            )
        for m in targets:
            encoder = self.base.encoders[m]
            if not hasattr(encoder, "attach_context"):
                raise ConfigError(
                    f"The '{m}' encoder ({type(encoder).__name__}) cannot take a context; Pro-Fusion needs "
                    "encoders that subclass fusionbench.encoders.ContextEncoder."
                )
            encoder.attach_context(self.context_dim, layers.get(m, 0))
        source = {
            m: self.base.fused_dim if feedback == "fused" else int(self.base.encoders[m].output_dim)
            for m in targets
        }
        self.backproject = nn.ModuleDict(
            {m: nn.Linear(source[m], self.context_dim, bias=False) for m in targets}
        )
        self._norms = [
            name
            for name, mod in self.base.named_modules()
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.track_running_stats
        ]
        if self.unroll_steps > 1:
            for i, name in enumerate(self._norms):
                bn = self.base.get_submodule(name)
                for t in range(self.unroll_steps):
                    for stat in ("running_mean", "running_var", "num_batches_tracked"):
                        self.register_buffer(f"norm{i}_step{t}_{stat}", getattr(bn, stat).clone())

    def use_step_statistics(self, t: int) -> None:
        """Point every batch norm of the base at the running statistics of unroll step t (0-based); the
        buffers are shared, so training-mode updates land in that step's statistics."""
        if self.unroll_steps == 1:
            return
        t = min(t, self.unroll_steps - 1)
        for i, name in enumerate(self._norms):
            bn = self.base.get_submodule(name)
            for stat in ("running_mean", "running_var", "num_batches_tracked"):
                setattr(bn, stat, getattr(self, f"norm{i}_step{t}_{stat}"))

    @property
    def encoders(self) -> nn.ModuleDict:
        return self.base.encoders

    @property
    def fused_dim(self) -> int:
        return self.base.fused_dim

    @property
    def target_loss(self) -> Callable[[FusionOutput, torch.Tensor], torch.Tensor]:
        if not hasattr(self.base, "target_loss"):  # so `hasattr(model, "target_loss")` follows the base
            raise AttributeError("target_loss")
        return self.base.target_loss

    def context(self, step: FusionStep) -> dict[str, torch.Tensor]:
        """W_i applied to what is fed back: the fused vector, or each encoder's own output."""
        if self.feedback == "fused":
            return {m: w(step.fused) for m, w in self.backproject.items()}
        return {m: w(step.embeddings[m]) for m, w in self.backproject.items()}

    def unroll(self, inputs: Mapping[str, torch.Tensor], steps: int | None = None) -> list[FusionStep]:
        """Every step t = 1..R (eq. 8); step 1 runs with c_0 = 0, i.e. without context."""
        self.use_step_statistics(0)
        out = [self.base.step(inputs, None)]
        for t in range(1, steps or self.unroll_steps):
            self.use_step_statistics(t)
            out.append(self.base.step(inputs, self.context(out[-1])))
        return out

    def step(
        self, inputs: Mapping[str, torch.Tensor], context: Mapping[str, torch.Tensor] | None = None
    ) -> FusionStep:
        if context is not None:
            raise ConfigError("Pro-Fusion cannot itself be wrapped by a model that feeds it a context.")
        last = self.unroll(inputs)[-1]
        info = dict(last.info)
        if self.unroll_steps > 1:
            ctx = self.context(last)  # the context a further step would get: its scale is worth watching
            info["pro/context_rms"] = (
                torch.stack([c.detach().pow(2).mean() for c in ctx.values()]).mean().sqrt()
            )
        return last._replace(info=info)

    def predict(self, step: FusionStep) -> FusionOutput:
        return self.base.predict(step)  # eq. 9

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> FusionOutput:
        return self.predict(self.step(inputs))
