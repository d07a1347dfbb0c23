"""Multimodal Transformer (MulT; Tsai et al. 2019, "Multimodal Transformer for Unaligned Multimodal
Language Sequences") as MultiBench's finance example runs it on stock series, and as its affect example
(``examples/affect/affect_mult.py``) runs it on CMU-MOSI / CMU-MOSEI.

Grouping (MultiBench ``examples/finance/stocks_mult.py`` with ``datasets.stocks.get_data.Grouping``):
the sector's stocks, in sorted order, are cut into G contiguous groups, group i holding stocks
``[n*i//G, n*(i+1)//G)`` (13 stocks, G = 3: 4 / 4 / 5; note this puts the larger groups *last*,
unlike ``numpy.array_split``). Each group is one MulT "modality" whose per-step features are its
stocks' returns; ``group_members`` sets the groups explicitly instead. On the affect data
``groups=3`` over the three modalities makes each modality its own group (sorted: audio, text, vision =
g0, g1, g2), each with its own projection from its own per-step width (MOSEI 74 / 300 / 35), as
MultiBench's ``MULTModel(3, [35, 74, 300])``.

The network (MulT's Figure 2, as MultiBench's ``fusions/finance/mult.py``):

1. per group a bias-free per-step projection to ``dim`` (MulT's ``Conv1d(n_g, d, 1, bias=False)``);
2. crossmodal transformers CM_{j->i}: the target group i's sequence attends to the source group j's,

       CM_{j->i}(X_i, X_j) = softmax(Q_i K_j^T / sqrt(d)) V_j,
       Q_i = X_i W_Q,  K_j = X_j W_K,  V_j = X_j W_V,

   in ``layers`` pre-LayerNorm blocks (attention, residual; LayerNorm, ReLU feed-forward of width
   ``ff_mult * dim``, residual) and a final LayerNorm. Inputs are scaled by sqrt(dim) and get
   sinusoidal positions and embedding dropout first, as in MulT's ``TransformerEncoder`` (its fairseq
   table, positions 1..T; MulT's rule that a step whose first feature is exactly 0 is padding is not kept);
3. per target i the crossmodal outputs are concatenated along features and run through a
   self-attention "memory" transformer (MulT's ``trans_*_mem``) whose last time step is kept;
4. the targets' last steps are concatenated and passed through MulT's residual block
   ``h + proj2(dropout(relu(proj1(h))))``; the head (one linear layer by default) predicts.

MultiBench's finance variant differs from the paper's MulT in three ways, all kept as defaults and
switchable: each group also attends to itself (``attend_self``; the paper uses only j != i), every
attention is causal (``causal``; MultiBench's ``attn_mask=True``), and the crossmodal attention has no
dropout (``cross_attn_dropout=0``; MultiBench's ``attn_dropout_modalities``) while the memory's has 0.1.
MultiBench sets the crossmodal attention dropout per *source* modality (``attn_dropout_modalities[j]``;
affect: 0 / 0 / 0.1 for vision / audio / text), so ``cross_attn_dropout`` may also map source modalities
(or group names) to rates, e.g. ``{text: 0.1}``.

Under Pro-Fusion the context joins each group's projection (`GroupProjection`): the projection of
``[x_t ; c]`` with ``[P, B]``, at every time step, as for `TransformerSeqEncoder`. The group encoders
return sequences (B, T, dim), so Pro-Fusion's ``feedback=own`` (which back-projects an encoder's own
output) is not supported; ``feedback=fused`` is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fusionbench.encoders.context import ContextEncoder
from fusionbench.errors import ConfigError
from fusionbench.fusion.base import EncoderFusion


def split_groups(modalities: Sequence[str], groups: int) -> list[list[str]]:
    """MultiBench's ``Grouping``: group i = sorted modalities ``[n*i//G, n*(i+1)//G)``."""
    names, n = sorted(modalities), len(modalities)
    return [names[n * i // groups : n * (i + 1) // groups] for i in range(groups)]


def sinusoidal_positions(length: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """MulT's (fairseq's) table for positions 1..T: ``[sin | cos | 0 if dim is odd]``, (T, dim)."""
    half = dim // 2
    freq = torch.exp(
        torch.arange(half, device=device, dtype=torch.float32) * -(math.log(10000.0) / max(half - 1, 1))
    )
    angle = torch.arange(1, length + 1, device=device, dtype=torch.float32).unsqueeze(1) * freq
    table = torch.cat([torch.sin(angle), torch.cos(angle), angle.new_zeros(length, dim - 2 * half)], dim=1)
    return table.to(dtype)


class GroupProjection(ContextEncoder):
    """A group's stacked per-step features (B, T, in_features) -> (B, T, dim) by a bias-free linear map
    (MulT's kernel-1 Conv1d). A context (layer 0) is added after the projection at every time step,
    i.e. the projection of ``[x_t ; c]``; its output is a sequence, not a vector."""

    def __init__(self, in_features: int, dim: int) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.dim = int(dim)
        self.proj = nn.Linear(self.in_features, self.dim, bias=False)
        self.output_dim = self.dim

    def join_widths(self) -> list[int]:
        return [self.dim]

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is not None and context.dim() != 2:
            raise ConfigError(
                f"MulT's group projections take a (batch, context_dim) context, got {tuple(context.shape)}. "
                "Its group encoders output sequences, so Pro-Fusion's feedback=own is not supported with "
                "MulT; use feedback=fused."
            )
        h = self.proj(x)  # (B, T, dim)
        return self.join(0, h.transpose(1, 2), context).transpose(1, 2)  # the join adds over trailing axes


class CrossmodalLayer(nn.Module):
    """One pre-LayerNorm block of MulT's ``TransformerEncoderLayer``. With a source (key, value) it is a
    crossmodal block, otherwise self-attention. The same LayerNorm normalises query, key and value."""

    def __init__(
        self, dim: int, heads: int, attn_dropout: float, relu_dropout: float, res_dropout: float, ff_mult: int
    ) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=attn_dropout, batch_first=True)
        self.norm_attn = nn.LayerNorm(dim)
        self.norm_ff = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ff_mult * dim)
        self.fc2 = nn.Linear(ff_mult * dim, dim)
        for fc in (self.fc1, self.fc2):  # MulT's Linear(): Xavier-uniform weights, zero bias
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        self.relu_dropout = float(relu_dropout)
        self.res_dropout = float(res_dropout)

    def forward(
        self,
        x: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q = self.norm_attn(x)
        k = q if key is None else self.norm_attn(key)
        v = q if value is None else self.norm_attn(value)
        # the is_causal hint (same mask) lets fused GPU attention kernels skip the masked half
        causal = mask is not None and mask.shape[0] == mask.shape[1]
        h, _ = self.attn(q, k, v, attn_mask=mask, need_weights=False, is_causal=causal)
        x = x + F.dropout(h, self.res_dropout, self.training)
        h = F.dropout(F.relu(self.fc1(self.norm_ff(x))), self.relu_dropout, self.training)
        return x + F.dropout(self.fc2(h), self.res_dropout, self.training)


class MulTEncoder(nn.Module):
    """MulT's ``TransformerEncoder``: input * sqrt(dim) (+ sinusoidal positions), embedding dropout,
    ``layers`` blocks, a final LayerNorm. ``forward(x, source)`` is the crossmodal transformer
    CM_{source->x}; ``forward(x)`` the self-attention memory."""

    def __init__(
        self,
        dim: int,
        heads: int,
        layers: int,
        attn_dropout: float,
        relu_dropout: float,
        res_dropout: float,
        embed_dropout: float,
        ff_mult: int,
        positions: bool,
        causal: bool,
    ) -> None:
        super().__init__()
        self.dim = int(dim)
        self.positions = bool(positions)
        self.causal = bool(causal)
        self.embed_dropout = float(embed_dropout)
        self.layers = nn.ModuleList(
            CrossmodalLayer(dim, heads, attn_dropout, relu_dropout, res_dropout, ff_mult)
            for _ in range(int(layers))
        )
        self.norm = nn.LayerNorm(dim)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = x * math.sqrt(self.dim)
        if self.positions:
            x = x + sinusoidal_positions(x.shape[1], self.dim, x.device, x.dtype)
        return F.dropout(x, self.embed_dropout, self.training)

    def forward(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        t_q = x.shape[1]
        t_k = t_q if source is None else source.shape[1]
        # MulT's buffered_future_mask: step t sees source steps <= t (True = masked)
        mask = (
            torch.ones(t_q, t_k, dtype=torch.bool, device=x.device).triu(1 + abs(t_k - t_q))
            if self.causal
            else None
        )
        # key and value get their own embedding dropout (MulT embeds them separately)
        key, value = (None, None) if source is None else (self.embed(source), self.embed(source))
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h, key, value, mask)
        return self.norm(h)


class MulTFusion(EncoderFusion):
    """Args:
    encoders: the backbone's per-stock encoders; only their ``in_features`` (default 1) is read, then
        they are dropped: the model is MulT's network alone.
    num_outputs: regression targets / classes.
    groups: G, contiguous groups of the sorted modalities (MultiBench: 3).
    group_members: explicit groups (lists of modality keys, every modality exactly once); overrides
        ``groups``.
    dim: MulT's embedding width d (MultiBench finance: 9).
    heads: attention heads (3); ``dim`` must be divisible by it.
    layers: crossmodal layers (3).
    self_layers: layers of each target's self-attention memory transformer (3).
    attn_dropout: attention dropout of the memory transformers (0.1).
    cross_attn_dropout: attention dropout of the crossmodal transformers CM_{j->i} (MultiBench finance:
        0); a number for all, or ``{source: rate}`` keyed by modality or group name, the rate of source
        group j (unnamed sources: 0; MultiBench affect: ``{text: 0.1}``).
    relu_dropout, res_dropout: dropout after the feed-forward ReLU / on each residual branch (0.1).
    embed_dropout: dropout on every transformer's scaled, position-encoded input (0.25).
    out_dropout: dropout inside the final residual block (0).
    ff_mult: feed-forward width as a multiple of the transformer width (4).
    positions: add sinusoidal positions to every transformer input.
    causal: causal attention masks (MultiBench's ``attn_mask=True``).
    attend_self: also run CM_{i->i} (MultiBench's finance MulT); false = the paper's j != i only.
    head_hidden, head_dropout: the head (empty: one linear layer, as MulT's ``out_layer``).
    """

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        num_outputs: int,
        groups: int = 3,
        group_members: Sequence[Sequence[str]] | None = None,
        dim: int = 9,
        heads: int = 3,
        layers: int = 3,
        self_layers: int = 3,
        attn_dropout: float = 0.1,
        cross_attn_dropout: float | Mapping[str, float] = 0.0,
        relu_dropout: float = 0.1,
        res_dropout: float = 0.1,
        embed_dropout: float = 0.25,
        out_dropout: float = 0.0,
        ff_mult: int = 4,
        positions: bool = True,
        causal: bool = True,
        attend_self: bool = True,
        **head,
    ) -> None:
        self.input_modalities = sorted(encoders)
        if dim % heads:
            raise ConfigError(f"MulT needs fusion.dim ({dim}) divisible by fusion.heads ({heads}).")
        members = (
            self.check_groups(group_members) if group_members is not None else self.default_groups(groups)
        )
        self.step_features = {m: int(getattr(encoders[m], "in_features", 1)) for m in self.input_modalities}
        self.group_names = [f"g{i}" for i in range(len(members))]
        self.members = dict(zip(self.group_names, members))
        projections = {
            g: GroupProjection(sum(self.step_features[m] for m in ms), dim) for g, ms in self.members.items()
        }
        super().__init__(nn.ModuleDict(projections), num_outputs, **head)
        self.modalities = list(
            self.group_names
        )  # g0 < g1 < ... < g9 sort the same; keep the numeric order beyond
        self.sources = {i: [j for j in self.group_names if attend_self or j != i] for i in self.group_names}
        self.cross_attn_dropout = self.source_dropouts(cross_attn_dropout)
        width = dim * len(self.sources[self.group_names[0]])  # one target's concatenated crossmodal streams
        common = {
            "heads": heads,
            "relu_dropout": relu_dropout,
            "res_dropout": res_dropout,
            "embed_dropout": embed_dropout,
            "ff_mult": ff_mult,
            "positions": positions,
            "causal": causal,
        }
        self.cross = nn.ModuleDict(
            {
                i: nn.ModuleDict(
                    {
                        j: MulTEncoder(dim, layers=layers, attn_dropout=self.cross_attn_dropout[j], **common)
                        for j in self.sources[i]
                    }
                )
                for i in self.group_names
            }
        )
        self.memory = nn.ModuleDict(
            {
                i: MulTEncoder(width, layers=self_layers, attn_dropout=attn_dropout, **common)
                for i in self.group_names
            }
        )
        self.fused_dim = width * len(self.group_names)
        self.proj1 = nn.Linear(self.fused_dim, self.fused_dim)
        self.proj2 = nn.Linear(self.fused_dim, self.fused_dim)
        self.out_dropout = float(out_dropout)
        self.build_head()

    def default_groups(self, groups: int) -> list[list[str]]:
        if groups < 2:
            raise ConfigError(
                "MulT fuses groups of modalities across each other: fusion.groups must be >= 2, got "
                f"{groups}."
            )
        if len(self.input_modalities) < groups:
            raise ConfigError(
                f"MulT splits the modalities into fusion.groups={groups} groups but there are only "
                f"{len(self.input_modalities)} ({self.input_modalities}); lower fusion.groups or add "
                "modalities."
            )
        return split_groups(self.input_modalities, groups)

    def source_dropouts(self, rates: float | Mapping[str, float]) -> dict[str, float]:
        """``{group: crossmodal attention dropout when it is the source}`` from a number or a mapping keyed
        by group or modality names (a group's members must then agree)."""
        if not isinstance(rates, Mapping):
            return {g: float(rates) for g in self.group_names}
        unknown = sorted(set(rates) - set(self.group_names) - set(self.input_modalities))
        if unknown:
            raise ConfigError(
                f"fusion.cross_attn_dropout names {unknown}, which are neither modalities "
                f"{self.input_modalities} nor groups {self.group_names}."
            )
        out = {}
        for g, members in self.members.items():
            given = {float(rates[g])} if g in rates else {float(rates[m]) for m in members if m in rates}
            if len(given) > 1:
                raise ConfigError(
                    f"fusion.cross_attn_dropout gives group {g} ({members}) the rates {sorted(given)}; its "
                    "members share one attention: give one rate per group."
                )
            out[g] = given.pop() if given else 0.0
        return out

    def check_groups(self, group_members: Sequence[Sequence[str]]) -> list[list[str]]:
        members = [list(g) for g in group_members]
        flat = [m for g in members for m in g]
        unknown = sorted(set(flat) - set(self.input_modalities))
        repeated = sorted({m for m in flat if flat.count(m) > 1})
        unused = sorted(set(self.input_modalities) - set(flat))
        if len(members) < 2 or any(not g for g in members) or unknown or repeated or unused:
            raise ConfigError(
                f"fusion.group_members must split the modalities {self.input_modalities} into >= 2 non-empty "
                f"groups, each modality exactly once; got {members} (unknown {unknown}, repeated {repeated}, "
                f"unused {unused})."
            )
        return [sorted(g) for g in members]

    def stack(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{group: (B, T, sum of its members' widths)}``, members in sorted order."""
        missing = [m for m in self.input_modalities if m not in inputs]
        if missing:
            raise ConfigError(
                f"The batch has modalities {sorted(inputs)}; MulT needs {self.input_modalities} (missing "
                f"{missing})."
            )
        series = {}
        for m in self.input_modalities:
            x = inputs[m].unsqueeze(-1) if inputs[m].dim() == 2 else inputs[m]
            if x.dim() != 3 or x.shape[-1] != self.step_features[m]:
                raise ConfigError(
                    f"MulT expects '{m}' as (batch, time, {self.step_features[m]}), got "
                    f"{tuple(inputs[m].shape)}."
                )
            series[m] = x
        lengths = {m: x.shape[1] for m, x in series.items()}
        if len(set(lengths.values())) != 1:
            raise ConfigError(
                "MulT (as MultiBench's finance model) needs equally long, aligned series; got lengths "
                f"{lengths}."
            )
        return {g: torch.cat([series[m] for m in ms], dim=-1) for g, ms in self.members.items()}

    def encode(
        self, inputs: Mapping[str, torch.Tensor], context: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """``{group: projected sequence (B, T, dim)}``; ``context`` is keyed by group."""
        context = context or {}
        return {g: self.encoders[g](x, context.get(g)) for g, x in self.stack(inputs).items()}

    def fuse(self, embeddings: Mapping[str, torch.Tensor]) -> torch.Tensor:
        last = []
        for i in self.group_names:
            streams = [self.cross[i][j](embeddings[i], embeddings[j]) for j in self.sources[i]]
            last.append(self.memory[i](torch.cat(streams, dim=-1))[:, -1])
        h = torch.cat(last, dim=-1)
        return h + self.proj2(F.dropout(F.relu(self.proj1(h)), self.out_dropout, self.training))
