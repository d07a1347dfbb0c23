"""Sequence encoders for time series such as the stock returns (MultiBench finance models) and the
word-aligned CMU-MOSI / CMU-MOSEI features (MultiBench affect models).

All take ``(B, T, in_features)`` (a ``(B, T)`` tensor is read as ``in_features = 1``) and return one
vector per sample. None has a parameter called ``input_dim``: `fusionbench.train.build_encoders`
would fill that with the *flattened* feature count (500 for a 500-day window), not the per-step width.

Pro-Fusion's context (`ContextEncoder`, join layer 0 only) is concatenated to the input of *every*
time step, i.e. the sequence ``[x_t ; c]_{t=1..T}`` is encoded. As for the MLP, this is implemented
as an additive, bias-free projection on the per-step input map, which is the same function:

- `LSTMEncoder`: the LSTM's input-to-gates map ``W_ih x_t`` becomes ``W_ih x_t + B c`` (``B`` is
  ``context_join.proj.weight``, shape ``(4 hidden, context_dim)``), exactly an LSTM with input size
  ``in_features + context_dim`` and ``W_ih' = [W_ih, B]`` run on ``[x_t ; c]``.
- `GRUEncoder`: the same on the GRU's input map (``B``: ``(3 hidden, context_dim)``, one block per
  reset / update / candidate gate), exactly a GRU with input size ``in_features + context_dim``.
- `TransformerSeqEncoder`: the per-step input projection ``P x_t`` becomes ``P x_t + B c``, i.e. the
  projection of ``[x_t ; c]`` with ``P' = [P, B]``.

A zero context (or ``W = 0``) leaves every encoder unchanged.
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


def run_recurrent(
    rnn: nn.LSTM | nn.GRU, x: torch.Tensor, context: torch.Tensor | None, join: nn.Module | None
) -> torch.Tensor:
    """Top-layer outputs (B, T, hidden) of a ``batch_first`` LSTM/GRU from zero initial state; with a
    context, of the same network with input ``[x_t ; c]`` and first input map ``[W_ih, B]`` (``B`` =
    ``join.proj.weight``): the same weights, the same kernel. ``nn.LSTM``/``nn.GRU`` check input_size,
    so the widened input goes through the functional kernel they call themselves."""
    if context is None or join is None:
        return rnn(x)[0]
    b, t = x.shape[:2]
    xc = torch.cat([x, context.unsqueeze(1).expand(b, t, context.shape[-1]).to(x.dtype)], dim=-1)
    weights = list(rnn._flat_weights)
    weights[0] = torch.cat([weights[0], join.proj.weight], dim=1)
    h0 = x.new_zeros(rnn.num_layers, b, rnn.hidden_size)
    state = (h0, h0) if isinstance(rnn, nn.LSTM) else h0
    kernel = torch._VF.lstm if isinstance(rnn, nn.LSTM) else torch._VF.gru
    args = (rnn.bias, rnn.num_layers, float(rnn.dropout), rnn.training, rnn.bidirectional, rnn.batch_first)
    return kernel(xc, state, weights, *args)[0]


def skip_leading_padding(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's steps from its first non-zero step on, moved to the front: ``(x', last)`` with
    ``x'[b, :n_b] = x[b, T - n_b:]`` for the ``n_b`` steps from the first non-zero one (steps after
    ``n_b`` repeat the last step and are never read) and ``last[b] = n_b - 1``. A recurrent network
    is causal, so its output at ``last`` is its state after the real steps only, from ``h_0 = 0``: what
    MultiBench's packed sequences give (``has_padding=True``: its loader drops the steps before the
    first non-zero text step). An all-zero sample keeps its last step."""
    b, t, f = x.shape
    steps = torch.arange(t, device=x.device)
    real = x.ne(0).any(dim=-1)  # (B, T)
    first = torch.where(real, steps, t).amin(dim=1).clamp(max=t - 1)
    index = (first[:, None] + steps).clamp(max=t - 1)
    return x.gather(1, index[..., None].expand(b, t, f)), t - 1 - first


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
        return run_recurrent(self.lstm, x, context, self._modules.get("context_join"))[:, -1]


class GRUEncoder(ContextEncoder):
    """``nn.GRU(in_features, hidden, layers, batch_first=True)``; output = the top layer's last hidden
    state (B, hidden), optionally through dropout and a Linear: MultiBench's affect encoders
    ``unimodals.common_models.GRU`` and ``GRUWithLinear``.

    Args:
        in_features: values per time step (MOSEI: vision 35, audio 74, text 300).
        hidden: GRU width (MultiBench LF: 70 / 200 / 600; EF on the stacked 409 features: 512).
        layers: stacked GRU layers (MultiBench: 1).
        dropout: dropout between stacked layers (PyTorch's ``nn.GRU`` dropout; needs ``layers > 1``).
        out_dropout: dropout on the last hidden state (before ``out_features``' Linear). MultiBench's
            ``dropout=True`` (``dropoutp=0.1``) is ``out_dropout=0.1``: ``GRU`` applies it to the state it
            returns with ``has_padding=True`` (LF) but *not* with ``last_only=True`` (EF returns before its
            dropout); ``GRUWithLinear`` applies it between the state and its Linear (LRTF, TF).
        out_features: width of a Linear after the (dropped-out) last state, MultiBench's ``GRUWithLinear``
            (LRTF: 32 / 32 / 128; TF: 4 / 19 / 79); None: no Linear, output_dim = hidden.
        skip_padding: encode each sample from its first non-zero step on (`skip_leading_padding`), i.e. the
            state after the real words only, as MultiBench's packed sequences (``has_padding=True``) on the
            left-padded pickles; False runs the GRU over all ``T`` steps, padding included (MultiBench's
            ``has_padding=False``). A modality's own all-zero leading steps are taken as its padding (the
            pickles zero-pad the three modalities at the same steps; MultiBench cuts at the first text step).

    A context (`attach_context`, layer 0) is concatenated to every time step's input (module docstring).
    """

    width_key = "hidden"  # the argument that sets output_dim ("out_features" when it is given)

    def __init__(
        self,
        in_features: int = 1,
        hidden: int = 128,
        layers: int = 1,
        dropout: float = 0.0,
        out_dropout: float = 0.0,
        out_features: int | None = None,
        skip_padding: bool = False,
    ) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.hidden = int(hidden)
        self.skip_padding = bool(skip_padding)
        self.gru = nn.GRU(
            self.in_features,
            self.hidden,
            int(layers),
            batch_first=True,
            dropout=float(dropout) if layers > 1 else 0.0,
        )
        self.out_dropout = nn.Dropout(float(out_dropout))
        self.linear = None if out_features is None else nn.Linear(self.hidden, int(out_features))
        if self.linear is not None:
            self.width_key = "out_features"
        self.output_dim = self.hidden if self.linear is None else int(out_features)

    def join_widths(self) -> list[int]:
        return [3 * self.hidden]  # reset, update and candidate pre-activations of the first input map

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = as_sequence(x, self.in_features, "GRUEncoder")
        if self.skip_padding:
            x, last = skip_leading_padding(x)
        out = run_recurrent(self.gru, x, context, self._modules.get("context_join"))
        h = out[torch.arange(out.shape[0], device=out.device), last] if self.skip_padding else out[:, -1]
        h = self.out_dropout(h)
        return h if self.linear is None else self.linear(h)


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
        stack: let a fusion run this encoder together with others of the same shape as one batched
            computation (`fusionbench.encoders.stacked`: the same outputs, far fewer kernels for the 11-14
            per-stock encoders of the stock models); false runs it on its own.

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
        stack: bool = True,
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
        self.stack = bool(stack)
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
