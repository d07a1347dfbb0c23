"""Many encoders of one shape run as one batched computation: the per-stock Transformers of the late-fusion
stock models (Pro-Fusion Table 4: 11-14 encoders of width 9 per sector).

One such encoder is cheap but made of skinny kernels (a 9-wide model over 500 steps), so running 13 of them
one after another is bound by per-kernel overhead: about 60 kernels per layer per encoder on a GPU that does
almost nothing in each. `encode_stacked` stacks the encoders' weights along a new leading axis at every call
(``torch.stack`` of the parameters, so gradients flow back to each encoder's own parameters) and runs every
layer once for all of them with batched matrix products (``baddbmm``) and one attention call over
``encoders x batch`` sequences. The per-encoder modules stay the only parameters: checkpoints, optimiser
groups, Pro-Fusion's context joins and parameter counts are those of the per-stock model, and
``tests/test_stacked.py`` checks outputs and gradients against the per-encoder forward on the same weights.

Dropout draws one mask for the stack instead of one per encoder: the same distribution, a different random
stream, so a training run with dropout is not bit-identical to the per-encoder one (evaluation is). Compute
counts (`fusionbench.compute`) see the same operations, attributed to the fusion module instead of each
encoder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fusionbench.encoders.sequence import TransformerSeqEncoder, as_sequence


def stack_key(encoder: nn.Module, x: torch.Tensor, context: torch.Tensor | None) -> tuple | None:
    """Encoders with equal keys (same sizes, dropout, mode, input and context shapes) run as one stack;
    None: this encoder runs on its own."""
    if not isinstance(encoder, TransformerSeqEncoder) or not encoder.stack:
        return None
    layer = encoder.encoder.layers[0]
    if layer.activation_relu_or_gelu != 1:  # only PyTorch's default ReLU layers are restated below
        return None
    join = encoder._modules.get("context_join")
    uses_context = context is not None and join is not None
    return (
        encoder.in_features,
        encoder.dim,
        layer.self_attn.num_heads,
        len(encoder.encoder.layers),
        layer.linear1.out_features,
        (layer.dropout.p, layer.dropout1.p, layer.dropout2.p, layer.self_attn.dropout),
        (layer.norm1.eps, layer.norm_first, encoder.encoder.norm is not None),
        encoder.pool,
        type(encoder.positions).__name__,
        encoder.learned,
        encoder.training,
        tuple(context.shape) if uses_context else None,
        tuple(x.shape),
        x.dtype,
        x.device,
    )


def encode_all(
    encoders: Mapping[str, nn.Module],
    modalities: Sequence[str],
    inputs: Mapping[str, torch.Tensor],
    context: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """``{m: encoders[m](inputs[m], context.get(m))}``, with every group of two or more stackable encoders
    (`stack_key`) computed by one `encode_stacked` call."""
    groups: dict[tuple, list[str]] = {}
    single = []
    for m in modalities:
        key = stack_key(encoders[m], inputs[m], context.get(m))
        if key is None:
            single.append(m)
        else:
            groups.setdefault(key, []).append(m)
    out = {m: encoders[m](inputs[m], context.get(m)) for m in single}
    for members in groups.values():
        if len(members) == 1:
            out[members[0]] = encoders[members[0]](inputs[members[0]], context.get(members[0]))
            continue
        encoded = encode_stacked(
            [encoders[m] for m in members],
            [inputs[m] for m in members],
            [context.get(m) for m in members],
        )
        out.update(zip(members, encoded.unbind(0)))
    return {m: out[m] for m in modalities}


def _stack(modules: Sequence[nn.Module], name: str) -> torch.Tensor:
    return torch.stack([m.get_parameter(name) for m in modules])


def _linear(z: torch.Tensor, modules: Sequence[nn.Module], prefix: str) -> torch.Tensor:
    """Each encoder's ``nn.Linear`` on its slice: z (N, M, in) -> (N, M, out)."""
    weight = _stack(modules, f"{prefix}.weight").transpose(1, 2)
    if modules[0].get_submodule(prefix).bias is None:
        return torch.bmm(z, weight)
    return torch.baddbmm(_stack(modules, f"{prefix}.bias").unsqueeze(1), z, weight)


def _layer_norm(z: torch.Tensor, layers: Sequence[nn.Module], name: str) -> torch.Tensor:
    norm = layers[0].get_submodule(name)
    z = F.layer_norm(z, norm.normalized_shape, eps=norm.eps)
    return z * _stack(layers, f"{name}.weight").unsqueeze(1) + _stack(layers, f"{name}.bias").unsqueeze(1)


def _attention(z: torch.Tensor, layers: Sequence[nn.Module], batch: int, training: bool) -> torch.Tensor:
    """``nn.MultiheadAttention(z, z, z)`` of every encoder: z (N, B*T, d), one attention call."""
    n, bt, d = z.shape
    attn = layers[0].self_attn
    heads, t = attn.num_heads, bt // batch
    qkv = torch.baddbmm(
        _stack(layers, "self_attn.in_proj_bias").unsqueeze(1),
        z,
        _stack(layers, "self_attn.in_proj_weight").transpose(1, 2),
    )
    q, k, v = qkv.view(n * batch, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)
    a = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.dropout if training else 0.0)
    a = a.transpose(1, 2).reshape(n, bt, d)
    return _linear(a, layers, "self_attn.out_proj")


def _encoder_layer(z: torch.Tensor, layers: Sequence[nn.Module], batch: int, training: bool) -> torch.Tensor:
    """``nn.TransformerEncoderLayer`` (ReLU, post- or pre-norm) of every encoder on z (N, B*T, d)."""
    ref = layers[0]

    def sa(h: torch.Tensor) -> torch.Tensor:
        return F.dropout(_attention(h, layers, batch, training), ref.dropout1.p, training)

    def ff(h: torch.Tensor) -> torch.Tensor:
        h = F.dropout(F.relu(_linear(h, layers, "linear1")), ref.dropout.p, training)
        return F.dropout(_linear(h, layers, "linear2"), ref.dropout2.p, training)

    if ref.norm_first:
        z = z + sa(_layer_norm(z, layers, "norm1"))
        return z + ff(_layer_norm(z, layers, "norm2"))
    z = _layer_norm(z + sa(z), layers, "norm1")
    return _layer_norm(z + ff(z), layers, "norm2")


def encode_stacked(
    encoders: Sequence[TransformerSeqEncoder],
    inputs: Sequence[torch.Tensor],
    contexts: Sequence[torch.Tensor | None],
) -> torch.Tensor:
    """The outputs (N, B, dim) of N `TransformerSeqEncoder` s of one `stack_key` on their inputs, as one
    batched computation (module docstring). Training mode follows the first encoder."""
    ref = encoders[0]
    x = torch.stack(
        [as_sequence(v, ref.in_features, "TransformerSeqEncoder") for v in inputs]
    )  # (N, B, T, F)
    n, b, t, f = x.shape
    if (ref.positions is not None or ref.learned) and t > ref.max_len:
        raise ValueError(f"TransformerSeqEncoder got {t} time steps but max_len={ref.max_len}")
    h = _linear(x.reshape(n, b * t, f), encoders, "proj").view(n, b, t, ref.dim)
    if contexts[0] is not None and ref._modules.get("context_join") is not None:
        c = torch.stack(list(contexts))  # (N, B, context_dim); join layer 0 is the only one of this encoder
        h = h + _linear(c, encoders, "context_join.proj").unsqueeze(2)
    if ref.positions is not None:
        h = h + ref.positions.table[:t]
    elif ref.learned:
        h = h + _stack(encoders, "position_embedding")[:, None, :t]
    layers_per_encoder = [e.encoder.layers for e in encoders]
    z = h.reshape(n, b * t, ref.dim)
    for i in range(len(ref.encoder.layers)):
        z = _encoder_layer(z, [layers[i] for layers in layers_per_encoder], b, ref.training)
    if ref.encoder.norm is not None:
        z = _layer_norm(z, [e.encoder for e in encoders], "norm")
    z = z.view(n, b, t, ref.dim)
    return z[:, :, -1] if ref.pool == "last" else z.mean(dim=2)
