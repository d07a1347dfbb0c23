"""DynMM's built-in gates: an MLP over the flattened modalities (MM-IMDB), a transformer over concatenated
sequences (MOSEI) and a convolutional gate over concatenated images (the public code's global gate)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fusionbench.errors import ConfigError


def _tensors(inputs: Mapping[str, Any], modalities: Sequence[str], gate: str) -> list[torch.Tensor]:
    out = []
    for m in modalities:
        x = inputs[m]
        if not isinstance(x, torch.Tensor):
            raise ConfigError(
                f"The {gate} gate concatenates tensors, but modality '{m}' is a {type(x).__name__}; give "
                "`fusion.gate` a module of your own that reads these inputs."
            )
        out.append(x)
    return out


class MLPGate(nn.Module):
    """``[Linear -> ReLU -> Dropout]* -> Linear(num_outputs)`` over the flattened concatenation of all
    modalities (sorted); the first layer's input width is inferred at the first forward. The paper's
    MM-IMDB gate is ``hidden=[128]``."""

    def __init__(
        self,
        num_outputs: int,
        modalities: Sequence[str],
        hidden: Sequence[int] = (128,),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_outputs = int(num_outputs)
        self.modalities = sorted(modalities)
        layers: list[nn.Module] = []
        width = None
        for h in hidden:
            layers += [
                nn.LazyLinear(h) if width is None else nn.Linear(width, h),
                nn.ReLU(),
                nn.Dropout(dropout),
            ]
            width = h
        layers.append(
            nn.LazyLinear(self.num_outputs) if width is None else nn.Linear(width, self.num_outputs)
        )
        self.net = nn.Sequential(*layers)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.net(torch.cat([x.flatten(1) for x in _tensors(inputs, self.modalities, "mlp")], dim=1))


class TransformerGate(nn.Module):
    """Sequences (B, T, F_m) of equal length, concatenated along the features: a bias-free projection to
    ``dim``, ``layers`` transformer encoder layers, pooling over time (``last`` step or ``mean``), then
    ``Linear(dim, num_outputs)``. The paper's MOSEI gate: hidden 5, 2 heads (its code: width 10)."""

    def __init__(
        self,
        num_outputs: int,
        modalities: Sequence[str],
        dim: int = 10,
        heads: int = 2,
        layers: int = 1,
        ff: int = 32,
        dropout: float = 0.0,
        pool: str = "last",
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(
                f"fusion.gate_args.dim={dim} must be divisible by fusion.gate_args.heads={heads}."
            )
        if pool not in ("last", "mean"):
            raise ConfigError(f"fusion.gate_args.pool must be 'last' or 'mean', got {pool!r}.")
        self.num_outputs = int(num_outputs)
        self.modalities = sorted(modalities)
        self.pool = pool
        self.proj = nn.LazyLinear(dim, bias=False)
        layer = nn.TransformerEncoderLayer(dim, heads, ff, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(dim, self.num_outputs)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        xs = _tensors(inputs, self.modalities, "transformer")
        shapes = {m: tuple(x.shape) for m, x in zip(self.modalities, xs)}
        if any(x.dim() != 3 for x in xs) or len({x.shape[1] for x in xs}) != 1:
            raise ConfigError(
                "The transformer gate needs sequences (B, T, F) of one length T in every modality, got "
                f"{shapes}; use fusion.gate=mlp for other inputs."
            )
        h = self.encoder(self.proj(torch.cat(xs, dim=-1)))
        return self.out(h[:, -1] if self.pool == "last" else h.mean(dim=1))


class ConvGate(nn.Module):
    """Images (B, C_m, H, W) of one size, concatenated along the channels: ``blocks`` x [Conv k x k,
    stride 2 -> BatchNorm -> Tanh] with ``channels`` filters, global average pooling, a bias-free
    ``Linear(channels, num_outputs)`` (the public code's global gate, whose last layer is the same map as a
    bias-free 1x1 conv). ``size``: first average-pool every image to ``size`` x ``size`` (adaptive), so
    that images of different sizes can be stacked (AV-MNIST: the 112 x 112 spectrogram to the 28 x 28 digit)
    and the gate stays cheap."""

    def __init__(
        self,
        num_outputs: int,
        modalities: Sequence[str],
        channels: int = 8,
        kernel: int = 5,
        stride: int = 2,
        blocks: int = 2,
        size: int | None = None,
    ) -> None:
        super().__init__()
        if size is not None and int(size) < 1:
            raise ConfigError(f"fusion.gate_args.size must be a positive image side or null, got {size}.")
        self.num_outputs = int(num_outputs)
        self.modalities = sorted(modalities)
        self.size = None if size is None else int(size)
        layers: list[nn.Module] = []
        for b in range(blocks):
            conv = nn.LazyConv2d if b == 0 else nn.Conv2d
            args = (channels, kernel) if b == 0 else (channels, channels, kernel)
            layers += [conv(*args, stride=stride, padding=kernel // 2), nn.BatchNorm2d(channels), nn.Tanh()]
        self.features = nn.Sequential(*layers)
        self.out = nn.Linear(channels, self.num_outputs, bias=False)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        xs = _tensors(inputs, self.modalities, "conv")
        shapes = {m: tuple(x.shape) for m, x in zip(self.modalities, xs)}
        if any(x.dim() != 4 for x in xs):
            raise ConfigError(
                f"The conv gate needs images (B, C, H, W) in every modality, got {shapes}; use "
                "fusion.gate=mlp for other inputs."
            )
        if self.size is not None:
            xs = [F.adaptive_avg_pool2d(x, self.size) for x in xs]
        if len({tuple(x.shape[2:]) for x in xs}) != 1:
            raise ConfigError(
                f"The conv gate needs images (B, C, H, W) of one size H x W in every modality, got {shapes}; "
                "set fusion.gate_args.size to pool them to one size, or use fusion.gate=mlp."
            )
        return self.out(self.features(torch.cat(xs, dim=1)).mean(dim=(2, 3)))


GATES: dict[str, type[nn.Module]] = {"mlp": MLPGate, "transformer": TransformerGate, "conv": ConvGate}


def build_gate(
    gate: Any, gate_args: Mapping[str, Any], modalities: Sequence[str], expert_names: Sequence[str]
) -> nn.Module:
    """A built-in gate by name, a built module, or a node with ``_target_``; it must output one logit per
    expert."""
    n = len(expert_names)
    if isinstance(gate, str):
        if gate not in GATES:
            raise ConfigError(
                f"fusion.gate must be one of {sorted(GATES)} or a node with _target_, got {gate!r}."
            )
        try:
            module = GATES[gate](num_outputs=n, modalities=list(modalities), **dict(gate_args))
        except TypeError as exc:
            raise ConfigError(
                f"fusion.gate_args {dict(gate_args)} do not fit the {gate} gate: {exc}"
            ) from exc
    elif isinstance(gate, nn.Module):  # built by the caller
        if gate_args:
            raise ConfigError(
                "fusion.gate_args applies to the built-in gates; pass a built gate with its arguments set."
            )
        module = gate
    else:
        node = OmegaConf.to_container(gate, resolve=True) if isinstance(gate, DictConfig) else gate
        if not isinstance(node, Mapping) or "_target_" not in node:
            raise ConfigError(
                f"fusion.gate must be one of {sorted(GATES)} or a node with _target_, got {gate!r}."
            )
        if gate_args:
            raise ConfigError(
                "fusion.gate_args applies to the built-in gates; put a custom gate's arguments in its node."
            )
        node = dict(node)
        try:
            params = inspect.signature(get_class(node["_target_"])).parameters
        except (ValueError, TypeError, ImportError):
            params = {}
        if "modalities" in params and "modalities" not in node:
            node["modalities"] = list(modalities)
        module = instantiate(node, _convert_="all")
    width = getattr(module, "num_outputs", None)
    if width is None:
        width = getattr(module, "out_features", None)
    if width is None:
        raise ConfigError(f"The DynMM gate {type(module).__name__} must report its width as `num_outputs`.")
    if int(width) != n:
        raise ConfigError(
            f"The DynMM gate outputs {width} logits but there are {n} experts {list(expert_names)}; the gate "
            f"needs one output per expert (num_outputs: {n})."
        )
    return module
