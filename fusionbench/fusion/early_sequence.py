"""Early fusion for aligned sequences (MultiBench finance EF-LSTM / EF-Transformer): stack every
modality's ``(B, T, f_m)`` series along the feature axis, in sorted modality order, into
``(B, T, sum f_m)`` and run ONE sequence encoder on it, then the head.

MultiBench's EF-LSTM is ``Stack -> LSTM(n, 128) -> Linear(1)``; its EF-Transformer is
``Stack -> Conv1d(n, 9) -> 3-layer, 3-head encoder -> Linear(1)``. The backbone's per-modality
encoders are read only for their per-step width (``in_features``, default 1) and then dropped, so the
model (and its parameter count) is exactly the joint network. Under Pro-Fusion the context joins the
one ``joint`` encoder (concatenated to every time step of the stacked series).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fusionbench.errors import ConfigError
from fusionbench.fusion.base import EncoderFusion


def build_joint(encoder: Any, in_features: int) -> nn.Module:
    """The joint encoder from a partial/callable, a config node with ``_target_``, or a built module."""
    if isinstance(encoder, nn.Module):
        built = encoder
    elif isinstance(encoder, (Mapping, DictConfig)):
        node = OmegaConf.create(dict(encoder) if not isinstance(encoder, DictConfig) else encoder)
        if "_target_" not in node:
            raise ConfigError("fusion.encoder needs a `_target_` (e.g. fusionbench.encoders.LSTMEncoder).")
        node.pop("_partial_", None)
        built = instantiate(node, in_features=in_features, _convert_="all")
    elif callable(encoder):
        built = encoder(in_features=in_features)
    else:
        raise ConfigError(f"fusion.encoder must be a config node or a partial, got {type(encoder).__name__}.")
    width = getattr(built, "in_features", None)
    if width is not None and int(width) != in_features:
        raise ConfigError(
            f"The joint sequence encoder takes {width} features per step; the stacked inputs have "
            f"{in_features}."
        )
    return built


class EarlySequenceFusion(EncoderFusion):
    """Args:
    encoders: the backbone's per-modality encoders; only their ``in_features`` (default 1) is read.
    num_outputs: regression targets / classes.
    encoder: the joint sequence encoder, built with ``in_features = sum of the modalities' widths``:
        a Hydra ``_partial_`` node (as in ``configs/fusion/early_sequence.yaml``), a callable, or a
        config mapping with ``_target_``.
    head_hidden, head_dropout: the head (empty: one linear layer, as MultiBench).
    """

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        num_outputs: int,
        encoder: Callable[..., nn.Module] | Mapping[str, Any] | nn.Module | None = None,
        **head,
    ) -> None:
        if encoder is None:
            raise ConfigError("Early sequence fusion needs `fusion.encoder` (e.g. a partial LSTMEncoder).")
        self.input_modalities = sorted(encoders)
        self.step_features = {m: int(getattr(encoders[m], "in_features", 1)) for m in self.input_modalities}
        joint = build_joint(encoder, sum(self.step_features.values()))
        if not hasattr(joint, "output_dim"):
            raise ConfigError(f"The joint encoder ({type(joint).__name__}) has no `output_dim` attribute.")
        super().__init__(nn.ModuleDict({"joint": joint}), num_outputs, **head)
        self.fused_dim = int(joint.output_dim)
        self.build_head()

    def stack(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``(B, T, sum f_m)``, modalities in sorted order."""
        missing = [m for m in self.input_modalities if m not in inputs]
        if missing:
            raise ConfigError(
                f"The batch has modalities {sorted(inputs)}; early sequence fusion needs "
                f"{self.input_modalities}."
            )
        parts = []
        for m in self.input_modalities:
            x = inputs[m]
            x = x.unsqueeze(-1) if x.dim() == 2 else x
            if x.dim() != 3 or x.shape[-1] != self.step_features[m]:
                raise ConfigError(
                    f"Early sequence fusion expects '{m}' as (batch, time, {self.step_features[m]}), got "
                    f"{tuple(x.shape)}."
                )
            parts.append(x)
        lengths = {m: p.shape[1] for m, p in zip(self.input_modalities, parts)}
        if len(set(lengths.values())) != 1:
            raise ConfigError(
                f"Early sequence fusion needs equally long, aligned sequences; got lengths {lengths}."
            )
        return torch.cat(parts, dim=-1)

    def encode(
        self, inputs: Mapping[str, torch.Tensor], context: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        return {"joint": self.encoders["joint"](self.stack(inputs), (context or {}).get("joint"))}

    def fuse(self, embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
        return embeddings["joint"]
