"""Sequence encoders for time series such as the stock returns (MultiBench finance models).

Both take ``(B, T, in_features)`` (a ``(B, T)`` tensor is read as ``in_features = 1``) and return one
vector per sample. Neither has a parameter called ``input_dim``: `fusionbench.train.build_encoders`
would fill that with the *flattened* feature count (500 for a 500-day window), not the per-step width.

Pro-Fusion's context (`ContextEncoder`, join layer 0 only) is concatenated to the input of *every*
time step, i.e. the sequence ``[x_t ; c]_{t=1..T}`` is encoded. As for the MLP, this is implemented
as an additive, bias-free projection on the per-step input map, which is the same function:

- `LSTMEncoder`: the LSTM's input-to-gates map ``W_ih x_t`` becomes ``W_ih x_t + B c`` (``B`` is
  ``context_join.proj.weight``, shape ``(4 hidden, context_dim)``), exactly an LSTM with input size
  ``in_features + context_dim`` and ``W_ih' = [W_ih, B]`` run on ``[x_t ; c]``.
- `TransformerSeqEncoder`: the per-step input projection ``P x_t`` becomes ``P x_t + B c``, i.e. the
  projection of ``[x_t ; c]`` with ``P' = [P, B]``.

A zero context (or ``W = 0``) leaves both encoders unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fusionbench.encoders.context import ContextEncoder

POSITIONS = ("none", "sinusoidal", "learned")
POOLS = ("last", "mean")


def as_sequence(x: torch.Tensor, in_features: int, name: str) -> torch.Tensor:
    """``(B, T)`` -> ``(B, T, 1)``; checks the per-step width."""
    if x.dim() == 2:
        x = x.unsqueeze(-1)
    if x.dim() != 3 or x.shape[-1] != in_features:
        raise ValueError(f"{name} expects (batch, time, {in_features}) inputs, got shape {tuple(x.shape)}")
    return x


class LSTMEncoder(ContextEncoder):
    """``nn.LSTM(in_features, hidden, layers, batch_first=True)``; output = the last hidden state of the
    top layer, ``h_T`` (B, hidden), as MultiBench's ``unimodals.common_models.LSTM``.

    Args:
        in_features: values per time step (1 for one stock; n for n stacked stocks in early fusion).
        hidden: LSTM width (MultiBench LF-LSTM: 16 per stock; EF-LSTM: 128).
        layers: stacked LSTM layers.
        dropout: dropout between stacked layers (PyTorch's ``nn.LSTM`` dropout; needs ``layers > 1``).

    A context (`attach_context`, layer 0) is concatenated to every time step's input (module docstring).
    """

    width_key = "hidden"  # the argument that sets output_dim

    def __init__(
        self, in_features: int = 1, hidden: int = 128, layers: int = 1, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.hidden = int(hidden)
        self.lstm = nn.LSTM(
            self.in_features,
            self.hidden,
            int(layers),
            batch_first=True,
            dropout=float(dropout) if layers > 1 else 0.0,
        )
        self.output_dim = self.hidden

    def join_widths(self) -> list[int]:
        return [4 * self.hidden]  # the gate pre-activations of the first layer's input map

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = as_sequence(x, self.in_features, "LSTMEncoder")
        joint = self._modules.get("context_join")
        if context is None or joint is None:
            out, _ = self.lstm(x)
            return out[:, -1]
        # [x_t ; c] through an LSTM whose first input map is [W_ih, B]: the same weights, the same kernel.
        # nn.LSTM checks input_size, so the widened input goes through the functional kernel it calls itself.
        lstm = self.lstm
        b, t = x.shape[:2]
        xc = torch.cat([x, context.unsqueeze(1).expand(b, t, context.shape[-1]).to(x.dtype)], dim=-1)
        weights = list(lstm._flat_weights)
        weights[0] = torch.cat([weights[0], joint.proj.weight], dim=1)
        zeros = x.new_zeros(lstm.num_layers, b, lstm.hidden_size)
        out, _, _ = torch._VF.lstm(
            xc,
            (zeros, zeros),
            weights,
            lstm.bias,
            lstm.num_layers,
            float(lstm.dropout),
            self.training,
            lstm.bidirectional,
            lstm.batch_first,
        )
        return out[:, -1]


class SinusoidalPositions(nn.Module):
    """Fixed sin/cos positions of "Attention is all you need", added to (B, T, dim)."""

    def __init__(self, dim: int, max_len: int) -> None:
        super().__init__()
        pos = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
        freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
        table = torch.zeros(max_len, dim)
        table[:, 0::2] = torch.sin(pos * freq)
        table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
        self.register_buffer("table", table, persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.table[: h.shape[1]]


class TransformerSeqEncoder(ContextEncoder):
    """Per-step projection to ``dim`` (MultiBench: ``Conv1d(n, 9, kernel_size=1, bias=False)``, which is
    this bias-free linear map), optional positions, then ``nn.TransformerEncoder`` (post-norm, ReLU,
    ``batch_first``); output = the last time step's vector (MultiBench's ``[-1]``) or the mean over time.

    Args:
        in_features: values per time step.
        dim: model width (MultiBench finance: 9).
        heads: attention heads (3); ``dim`` must be divisible by it.
        layers: encoder layers (3).
        ff: feed-forward width (2048 = PyTorch's default, which MultiBench's finance Transformer keeps).
        dropout: dropout in the encoder layers (0.1 = PyTorch's default, as MultiBench).
        positions: ``none`` (MultiBench's finance Transformer adds none), ``sinusoidal`` or ``learned``.
        max_len: longest sequence for ``sinusoidal`` / ``learned`` positions.
        pool: ``last`` (MultiBench) or ``mean`` over time steps.

    A context (`attach_context`, layer 0) is concatenated to every time step's input (module docstring);
    it joins before the positions are added.
    """

    width_key = "dim"  # the argument that sets output_dim

    def __init__(
        self,
        in_features: int = 1,
        dim: int = 9,
        heads: int = 3,
        layers: int = 3,
        ff: int = 2048,
        dropout: float = 0.1,
        positions: str = "none",
        max_len: int = 500,
        pool: str = "last",
    ) -> None:
        super().__init__()
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.in_features = int(in_features)
        self.dim = int(dim)
        self.pool = pool
        self.max_len = int(max_len)
        self.proj = nn.Linear(self.in_features, self.dim, bias=False)
        if positions == "sinusoidal":
            self.positions: nn.Module | None = SinusoidalPositions(self.dim, self.max_len)
        elif positions == "learned":
            self.positions = None
            self.position_embedding = nn.Parameter(torch.randn(self.max_len, self.dim) * 0.02)
        else:
            self.positions = None
        self.learned = positions == "learned"
        layer = nn.TransformerEncoderLayer(self.dim, int(heads), int(ff), float(dropout), batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, int(layers), enable_nested_tensor=False)
        self.output_dim = self.dim

    def join_widths(self) -> list[int]:
        return [self.dim]

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = as_sequence(x, self.in_features, "TransformerSeqEncoder")
        if (self.positions is not None or self.learned) and x.shape[1] > self.max_len:
            raise ValueError(f"TransformerSeqEncoder got {x.shape[1]} time steps but max_len={self.max_len}")
        h = self.proj(x)  # (B, T, dim)
        h = self.join(0, h.transpose(1, 2), context).transpose(1, 2)  # the join adds over trailing axes
        if self.positions is not None:
            h = self.positions(h)
        elif self.learned:
            h = h + self.position_embedding[: h.shape[1]]
        h = self.encoder(h)
        return h[:, -1] if self.pool == "last" else h.mean(dim=1)
