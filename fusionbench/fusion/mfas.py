"""The AV-MNIST architecture found by Multimodal Fusion Architecture Search (MFAS; Pérez-Rúa et al.
2019), fixed as Pro-Fusion uses it (no search; Pro-Fusion appendix, Figure 10: "Every arrow into the
activation corresponds to a linear layer. The A4 and A5 represent the fourth and fifth layer of the
audio encoder. Similarly I2 and I3 represent the second and third layer of the image encoder").

A chain of fusion cells over pooled intermediate encoder layers, each one linear map per input
followed by an activation (MFAS ``Searchable``: one Linear over the concatenation, then ReLU /
sigmoid / leaky ReLU, hidden width ``rep_size`` = 16):

    h_1 = act_1(W_1^I x^I_{l_1} + W_1^A x^A_{k_1} + b_1)
    h_t = act_t(W_t^I x^I_{l_t} + W_t^A x^A_{k_t} + U_t h_{t-1} + b_t),  t = 2..T
    y   = head(h_T)                                          (MFAS: Linear(16, classes))

x^m_l is the globally average-pooled output of block l of the LeNet encoder (`LeNetEncoder.layer_outputs`).

Reading of Figure 10 (a documented guess, the figure gives no more): two cells, cell 1 fuses I2 with
A4 and cell 2 fuses I3 with A5 (and h_1). "Fourth layer" is read 1-based, i.e. 0-based block indices
image [1, 2] (12 and 24 channels) and audio [3, 4] (48 and 96 channels). This is the reading under which
every layer lies inside MFAS's own AV-MNIST search space (MultiBench: image sub-sizes (6, 12, 24),
audio (6, 12, 24, 48, 96)); 0-based I3 would be the 48-channel block, outside it. The activations are
not recoverable from the text: ReLU for both cells by default (``activations``). MFAS searches with
frozen pretrained unimodal LeNets; Pro-Fusion must train the encoders (the back-projections enter
them), so here everything is trained end to end from scratch. The blocks after the last fused layer
(image block 3, audio block 5) would get no gradient, so the encoders are truncated after the last fused
block (`LeNetEncoder.truncate`; parameters without gradient also break DDP); an encoder's own output, which
Pro-Fusion's ``feedback=own`` feeds back, is then its last fused block.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fusionbench.errors import ConfigError
from fusionbench.fusion.base import EncoderFusion, FusionStep

ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "leaky_relu": nn.LeakyReLU}
AVMNIST_LAYERS = {"image": (1, 2), "audio": (3, 4)}  # I2, I3 / A4, A5 of Figure 10, 0-based


class MFASFusion(EncoderFusion):
    """Args:
    encoders: one layered encoder per modality (``layer_outputs(x, context)`` and ``widths``,
        i.e. `LeNetEncoder`).
    num_outputs: classes.
    layers: modality -> 0-based encoder block fused by each cell (AV-MNIST: image [1, 2], audio [3, 4]).
    activations: activation of each cell (``relu``, ``sigmoid``, ``leaky_relu``); its length is
        the number of cells.
    hidden_dim: width of every cell, MFAS's ``rep_size`` (16).
    head_hidden: hidden widths of the head after the last cell (MFAS: none).
    head_dropout: dropout inside the head.
    """

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        num_outputs: int,
        layers: Mapping[str, Sequence[int]] = AVMNIST_LAYERS,
        activations: Sequence[str] = ("relu", "relu"),
        hidden_dim: int = 16,
        head_hidden: Sequence[int] = (),
        head_dropout: float = 0.0,
    ) -> None:
        super().__init__(encoders, num_outputs, head_hidden=head_hidden, head_dropout=head_dropout)
        layers = {m: [int(i) for i in v] for m, v in layers.items()}
        if sorted(layers) != self.modalities:
            raise ConfigError(
                f"fusion.layers names modalities {sorted(layers)} but the encoders are {self.modalities}; "
                "give the fused block indices of every encoder."
            )
        bad = [a for a in activations if a not in ACTIVATIONS]
        if bad or not activations:
            raise ConfigError(
                f"fusion.activations must be a non-empty list of {sorted(ACTIVATIONS)}, got "
                f"{list(activations)}."
            )
        cells = len(activations)
        widths = {}
        for m in self.modalities:
            enc = self.encoders[m]
            if not hasattr(enc, "layer_outputs") or not hasattr(enc, "widths"):
                raise ConfigError(
                    f"MFAS fuses intermediate encoder layers, but the '{m}' encoder ({type(enc).__name__}) "
                    "has no `layer_outputs`; use layered encoders (backbone=avmnist, LeNetEncoder)."
                )
            if len(layers[m]) != cells:
                raise ConfigError(
                    f"fusion.layers.{m} has {len(layers[m])} entries but there are {cells} cells "
                    "(fusion.activations)."
                )
            n = len(enc.widths)
            if any(not 0 <= i < n for i in layers[m]):
                raise ConfigError(
                    f"fusion.layers.{m}={layers[m]}: the '{m}' encoder has blocks 0..{n - 1} (0-based)."
                )
            if hasattr(enc, "truncate"):
                enc.truncate(max(layers[m]) + 1)
            widths[m] = [int(w) for w in enc.widths]
        self.layers = layers
        self.cells = nn.ModuleList()
        for t in range(cells):
            in_dim = sum(widths[m][layers[m][t]] for m in self.modalities) + (hidden_dim if t > 0 else 0)
            self.cells.append(nn.Sequential(nn.Linear(in_dim, hidden_dim), ACTIVATIONS[activations[t]]()))
        self.fused_dim = int(hidden_dim)
        self.build_head()

    def fuse_layers(self, features: Mapping[str, Sequence[torch.Tensor]]) -> torch.Tensor:
        """The cell chain on every encoder's pooled block outputs."""
        h = None
        for t, cell in enumerate(self.cells):
            parts = [features[m][self.layers[m][t]] for m in self.modalities]
            h = cell(torch.cat(parts if h is None else [*parts, h], dim=-1))
        return h

    def step(
        self, inputs: Mapping[str, torch.Tensor], context: Mapping[str, torch.Tensor] | None = None
    ) -> FusionStep:
        self.check_inputs(inputs)
        context = context or {}
        features = {m: self.encoders[m].layer_outputs(inputs[m], context.get(m)) for m in self.modalities}
        embeddings = {}
        for m in self.modalities:  # the encoder's own output (what `forward` returns), for feedback=own
            proj = getattr(self.encoders[m], "proj", None)
            embeddings[m] = proj(features[m][-1]) if proj is not None else features[m][-1]
        return FusionStep(self.fuse_layers(features), None, {}, embeddings)
