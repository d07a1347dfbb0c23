"""Compute accounting: multiply-adds (MAdds) and parameters of a model at batch 1.

`count_madds(model, inputs)` runs one forward pass of any ``nn.Module`` (eval mode, no grad) under
``torch.utils.flop_counter.FlopCounterMode`` and reports ``madds = FLOPs / 2``: torch counts one
multiply-add as 2 FLOPs (``2 * m * n * k`` for an ``m x k`` by ``k x n`` product). `model_compute(model, dm)`
does this for a fusion model on the first sample of a datamodule (batch 1) and returns the JSON the run
record stores under ``"compute"``; it never raises. Counts are shape-based, hence deterministic: they do
not depend on the weights, except through data-dependent control flow (the number of solver iterations
a DEQ actually runs on that sample, early exits), which the count follows for the weights it is given.
``by_module`` splits the total over the model's top-level children (``encoders.<modality>``, ``head``,
...), so the same call gives per-expert costs of a mixture.

What is counted (torch 2.14)
----------------------------
torch's own formulas (``flop_registry``):

* matrix products: ``mm``, ``addmm``, ``bmm``, ``baddbmm``, ``_scaled_mm``; every ``nn.Linear``,
  ``F.linear``, ``@``/``torch.matmul`` between matrices and most ``einsum`` contractions reach one of
  these. Only the product is counted: the bias add of ``addmm``/``nn.Linear`` is *not* (``Linear(10, 20)``
  at batch 1 is exactly 200 MAdds);
* convolutions of every dimension, transposed ones included (``convolution``, ``_convolution``,
  ``cudnn_convolution``, ``_slow_conv2d_forward``): ``out_elements * in_channels/groups * prod(kernel)``
  MAdds, bias not counted;
* attention kernels on GPU (``_scaled_dot_product_{flash,efficient,cudnn}_attention``, flash /
  efficient forward, ``flex_attention``): the ``QK^T`` and ``AV`` products (softmax not counted).

added here (``custom_mapping``), because torch 2.14 counts them as zero:

* ``_scaled_dot_product_flash_attention_for_cpu`` (what ``F.scaled_dot_product_attention`` runs on
  CPU), with torch's own SDPA formula;
* matrix-vector and vector products ``mv``, ``addmv``, ``dot``, ``vdot``, and ``addbmm``;
* ``_trilinear`` (``nn.Bilinear``): one MAdd per term of ``sum_ij x1_i W_kij x2_j``;
* recurrent kernels ``mkldnn_rnn_layer`` (``nn.LSTM`` on CPU), ``_cudnn_rnn`` and ``miopen_rnn``
  (LSTM/GRU/RNN on GPU): per time step and sample, one MAdd per entry of every weight matrix
  (``W_ih``, ``W_hh`` and the LSTM projection ``W_hr``), i.e. ``4h(in + h)`` for an LSTM layer and
  direction, ``3h(in + h)`` for a GRU, ``h(in + h)`` for a tanh/ReLU RNN. ``nn.GRU``/``nn.RNN`` on CPU
  and ``nn.LSTM`` with ``proj_size`` decompose into ``addmm``/``mm`` per step and give the same number.
  Gate nonlinearities and the elementwise cell update are not counted.

``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` have an eval-mode "fast path"
(``_native_multi_head_attention``, ``_transformer_encoder_layer_fwd``) torch does not count; the fast path
is switched off while counting, so their projections (``addmm``), attention products (``bmm`` or SDPA)
and feed-forward layers are counted like in training.

Not counted (zero): elementwise arithmetic, including broadcast outer products (tensor fusion's outer
product is elementwise multiplies; the ``nn.Linear`` after it is counted), activations, softmax
outside the attention kernels, normalisation (Batch/Layer/GroupNorm), pooling, dropout, embedding
lookups, reductions, indexing/concatenation, and any other custom op without a formula (it adds zero,
silently; ``by_op`` lists what was counted).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

log = logging.getLogger("fusionbench")

aten = torch.ops.aten

COUNTER = "torch.utils.flop_counter (FLOPs/2) + CPU SDPA, mv/dot, bilinear and RNN-kernel formulas"


# -- formulas for ops torch 2.14 counts as zero; arguments arrive as shapes (torch's shape_wrapper) ------
def _numel(shape) -> int:
    return math.prod(int(s) for s in shape)


def _mv_flop(mat_shape, vec_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _numel(mat_shape)


def _addmv_flop(self_shape, mat_shape, vec_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _numel(mat_shape)


def _dot_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _numel(a_shape)


def _addbmm_flop(self_shape, b1_shape, b2_shape, *args, out_shape=None, **kwargs) -> int:
    b, m, k = b1_shape
    return 2 * b * m * k * int(b2_shape[-1])


def _sdpa_cpu_flop(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q_shape, k_shape, v_shape)


def _expanded(shape, expand) -> list[int]:
    out = list(shape)
    for d in sorted(expand):
        out.insert(d, 1)
    return out


def _trilinear_flop(i1, i2, i3, expand1, expand2, expand3, sumdim, *args, out_shape=None, **kwargs) -> int:
    """Every term of the sum-product over the broadcast index space is one multiply-add."""
    terms = torch.broadcast_shapes(
        *(torch.Size(_expanded(s, e)) for s, e in ((i1, expand1), (i2, expand2), (i3, expand3)))
    )
    return 2 * _numel(terms)


def _rnn_steps(input_shape) -> int:
    # (T, B, in) / (B, T, in), or a packed sequence's (sum of lengths, in)
    return _numel(input_shape[:-1])


def _weight_matrices(weights) -> int:
    return sum(_numel(w) for w in weights if w is not None and len(w) == 2)


def _mkldnn_rnn_layer_flop(input_shape, w_ih, w_hh, *args, out_shape=None, **kwargs) -> int:
    """One layer and direction of a CPU LSTM: ``W_ih`` (4h, in) and ``W_hh`` (4h, h) per time step."""
    return 2 * _rnn_steps(input_shape) * (_numel(w_ih) + _numel(w_hh))


def _cudnn_rnn_flop(input_shape, weights, *args, out_shape=None, **kwargs) -> int:
    """All layers and directions: every 2-D entry of the flat weight list is used once per step."""
    return 2 * _rnn_steps(input_shape) * _weight_matrices(weights)


EXTRA_FORMULAS: dict[Any, Any] = {
    aten.mv: _mv_flop,
    aten.addmv: _addmv_flop,
    aten.dot: _dot_flop,
    aten.vdot: _dot_flop,
    aten.addbmm: _addbmm_flop,
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flop,
    aten._trilinear: _trilinear_flop,
    aten.mkldnn_rnn_layer: _mkldnn_rnn_layer_flop,
    aten._cudnn_rnn: _cudnn_rnn_flop,
    aten.miopen_rnn: _cudnn_rnn_flop,
}


@dataclass
class ComputeCount:
    """One forward pass: ``madds`` (= ``flops // 2``), parameters, and where the MAdds were counted."""

    madds: int
    flops: int
    params: int
    trainable_params: int
    by_op: dict[str, int] = field(default_factory=dict)  # aten op -> MAdds
    by_module: dict[str, int] = field(
        default_factory=dict
    )  # top-level child (ModuleDicts: each entry) -> MAdds

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; a parameter shared by several modules counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _module_groups(model: nn.Module) -> dict[str, nn.Module]:
    """Top-level children; a ModuleDict / ModuleList child (``encoders``) is split into its entries."""
    groups: dict[str, nn.Module] = {}
    for name, child in model.named_children():
        if isinstance(child, (nn.ModuleDict, nn.ModuleList)) and len(child) > 0:
            for sub, mod in child.named_children():
                groups[f"{name}.{sub}"] = mod
        else:
            groups[name] = child
    return groups


def _device_of(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


class _ExclusiveAttribution:
    """Charges every counted FLOP to the innermost running group module (or ``(rest)``), like an
    exclusive-time profiler: a group that calls a sibling (a DEQ solver calling the fusion layers) is
    charged only for its own ops, so the groups sum to the total exactly."""

    REST = "(rest)"

    def __init__(self, counter: FlopCounterMode, groups: Mapping[str, nn.Module]) -> None:
        self.counter = counter
        self.flops = dict.fromkeys([*groups, self.REST], 0)
        self.stack: list[str] = []
        self.last = 0
        self.handles = []
        seen: set[int] = set()
        for name, mod in groups.items():
            if id(mod) in seen:  # one module under two names: charged to the first
                continue
            seen.add(id(mod))
            self.handles.append(mod.register_forward_pre_hook(lambda *_, n=name: self._switch(push=n)))
            self.handles.append(
                mod.register_forward_hook(lambda *_: self._switch(push=None), always_call=True)
            )

    def _switch(self, push: str | None) -> None:
        now = self.counter.get_total_flops()
        self.flops[self.stack[-1] if self.stack else self.REST] += now - self.last
        self.last = now
        if push is None:
            if self.stack:
                self.stack.pop()
        else:
            self.stack.append(push)

    def close(self) -> dict[str, int]:
        for h in self.handles:
            h.remove()
        self.flops[self.REST] += self.counter.get_total_flops() - self.last
        self.last = self.counter.get_total_flops()
        return self.flops


def count_madds(model: nn.Module, inputs: Any) -> ComputeCount:
    """Count one ``model(inputs)`` forward (a tuple/list of inputs is unpacked as positional arguments).

    The model runs in eval mode under ``torch.no_grad()``, with the RNG state forked (dropout or
    sampling draws change nothing outside) and the MHA fast path off; every module's ``training`` flag
    and the fast-path setting are restored afterwards, also when the forward raises. ``by_module``
    splits the MAdds over the model's top-level children (a ModuleDict/ModuleList child such as
    ``encoders`` into its entries), each op charged to the innermost of them that ran it; ``(rest)`` is
    what the model's own forward ran outside them.
    """
    device = _device_of(model)
    inputs = _to(inputs, device)
    modes = {m: m.training for m in model.modules()}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    counter = FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS)
    attribution = _ExclusiveAttribution(counter, _module_groups(model))
    try:
        model.eval()
        torch.backends.mha.set_fastpath_enabled(False)
        with (
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            torch.no_grad(),
            counter,
        ):
            model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)
    finally:
        by_module = attribution.close()
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for m, training in modes.items():
            m.training = training
    flops = int(counter.get_total_flops())
    counts = counter.get_flop_counts().get("Global", {})
    by_op = {str(op): int(v) // 2 for op, v in sorted(counts.items(), key=lambda kv: str(kv[0]))}
    total, trainable = count_params(model)
    return ComputeCount(flops // 2, flops, total, trainable, by_op, {k: v // 2 for k, v in by_module.items()})


def batch_one(dataset: Dataset) -> Any:
    """The first sample's ``inputs``, collated as a DataLoader would at batch size 1."""
    return default_collate([dataset[0]["inputs"]])


def model_compute(model: nn.Module, dm) -> dict[str, Any]:
    """What the run record stores: MAdds and parameters of ``model`` on the first test sample of ``dm``
    (the first training sample when the test split is empty), at batch 1. Never raises: a failure is
    logged and recorded as ``{"error": message}``."""
    try:
        dataset = dm.test_set if len(dm.test_set) > 0 else dm.train_set
        inputs = batch_one(dataset)
        count = count_madds(model, inputs)
    except Exception as exc:  # noqa: BLE001 - accounting must never end a finished run
        message = f"{type(exc).__name__}: {exc}"
        log.warning("Could not count the model's multiply-adds (%s); the record stores the error.", message)
        return {"error": message}
    shapes = (
        {m: list(x.shape) for m, x in inputs.items() if isinstance(x, torch.Tensor)}
        if isinstance(inputs, Mapping)
        else None
    )
    return {
        "madds": count.madds,
        "params": count.params,
        "trainable_params": count.trainable_params,
        "batch": 1,
        "input_shapes": shapes,
        "counter": COUNTER,
        "by_module": count.by_module,
        "by_op": count.by_op,
    }


__all__ = ["COUNTER", "ComputeCount", "batch_one", "count_madds", "count_params", "model_compute"]
