"""Compute accounting (`fusionbench.compute`): MAdds match hand counts on small nets, are taken at
batch 1, and every run record stores them."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, compose_cfg
from torch import nn

from fusionbench.compute import batch_one, count_madds, model_compute
from fusionbench.train import build, train


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))


def test_mlp_matches_hand_count():
    count = count_madds(mlp(), torch.randn(1, 10))
    # one MAdd per weight entry per sample; torch does not count the bias adds of addmm, nor the ReLU
    assert count.madds == 10 * 20 + 20 * 3 == 260
    assert count.flops == 2 * 260
    assert count.by_op == {"aten.addmm": 260}
    assert count.by_module == {"0": 200, "1": 0, "2": 60, "(rest)": 0}


def test_conv_net_matches_hand_count():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    count = count_madds(net, torch.randn(1, 1, 8, 8))
    conv = 8 * 8 * 4 * 1 * 3 * 3  # out_h * out_w * out_ch * in_ch * k * k (bias not counted)
    linear = 4 * 8 * 8 * 5
    assert count.madds == conv + linear == 2304 + 1280
    assert count.by_op == {"aten.convolution": conv, "aten.addmm": linear}
    transposed = count_madds(nn.ConvTranspose2d(2, 3, 3), torch.randn(1, 2, 5, 5))
    assert transposed.madds == 5 * 5 * 2 * 3 * 3 * 3  # every input pixel scatters in_ch x out_ch x k x k


def test_recurrent_nets_match_hand_formula():
    class Seq(nn.Module):
        def __init__(self, rnn: nn.Module) -> None:
            super().__init__()
            self.rnn, self.head = rnn, nn.Linear(5, 3)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    x = torch.randn(1, 7, 2)
    lstm = count_madds(Seq(nn.LSTM(2, 5, batch_first=True)), x)
    assert lstm.madds == 7 * 4 * 5 * (2 + 5) + 5 * 3  # T * 4h(in + h) + head
    assert lstm.by_module == {"rnn": 7 * 4 * 5 * 7, "head": 15, "(rest)": 0}
    gru = count_madds(Seq(nn.GRU(2, 5, batch_first=True)), x)
    assert gru.madds == 7 * 3 * 5 * (2 + 5) + 5 * 3
    deep = count_madds(nn.LSTM(2, 5, num_layers=2, bidirectional=True, batch_first=True), x)
    assert deep.madds == 7 * 2 * (4 * 5 * (2 + 5) + 4 * 5 * (2 * 5 + 5))  # layer 2 reads both directions


def test_attention_bilinear_and_matrix_vector_products_are_counted():
    x = torch.randn(1, 5, 8)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    attention = 2 * 2 * 5 * 5 * 4  # QK^T and AV: 2 products, 2 heads, 5x5 scores, head dim 4
    # projections: q, k, v and out, each 5 tokens x 8 x 8; the eval fast path is switched off while counting
    assert count_madds(mha, (x, x, x)).madds == 4 * 5 * 8 * 8 + attention
    assert count_madds(mha, (x, x, x, None, False)).madds == 4 * 5 * 8 * 8 + attention  # through SDPA on CPU
    assert torch.backends.mha.get_fastpath_enabled()  # restored

    class Sdpa(nn.Module):
        def forward(self, q):
            return F.scaled_dot_product_attention(q, q, q)

    assert count_madds(Sdpa(), torch.randn(1, 2, 5, 4)).madds == attention
    assert count_madds(nn.Bilinear(3, 4, 5), (torch.randn(1, 3), torch.randn(1, 4))).madds == 3 * 4 * 5

    class MatVec(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 8))

        def forward(self, v):
            return self.w @ v + (v @ v)

    assert count_madds(MatVec(), torch.randn(8)).madds == 3 * 8 + 8


def test_by_module_charges_each_op_to_the_innermost_child():
    class Solver(nn.Module):  # like a DEQ solver: iterates a layer that is a sibling, not its child
        def __init__(self, layer: nn.Module) -> None:
            super().__init__()
            self.proj, self.layer = nn.Linear(4, 4), [layer]

        def forward(self, z):
            for _ in range(3):
                z = self.layer[0](self.proj(z))
            return z

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 4)
            self.solver = Solver(self.layer)
            self.out = nn.Parameter(torch.randn(4, 2))

        def forward(self, x):
            return self.solver(x) @ self.out

    count = count_madds(Net(), torch.randn(1, 4))
    assert count.by_module == {"layer": 3 * 16, "solver": 3 * 16, "(rest)": 8}
    assert sum(count.by_module.values()) == count.madds


def test_batch_scales_counts_and_params_are_all_parameters():
    net = mlp()
    net.requires_grad_(False)
    net[2].requires_grad_(True)
    one, four = count_madds(net, torch.randn(1, 10)), count_madds(net, torch.randn(4, 10))
    assert four.madds == 4 * one.madds
    assert one.params == sum(p.numel() for p in net.parameters()) == 10 * 20 + 20 + 20 * 3 + 3
    assert one.trainable_params == 20 * 3 + 3


def test_counting_keeps_modes_and_rng_and_is_deterministic():
    net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    net.train()
    net[2].eval()
    x = torch.randn(1, 4)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    first = count_madds(net, x)  # the forward would draw a dropout mask in training mode
    assert torch.equal(torch.rand(3), expected)
    assert [m.training for m in net.modules()] == [True, True, True, False]
    assert count_madds(net, torch.randn(1, 4)) == first


def test_model_compute_uses_batch_one_of_the_test_split(make_cfg):
    dm, task = build(make_cfg(["dataset=synthetic", "fusion=concat"]))
    inputs = batch_one(dm.test_set)
    assert all(x.shape[0] == 1 for x in inputs.values())
    record = model_compute(task.model, dm)
    assert record["batch"] == 1 and record["madds"] == count_madds(task.model, inputs).madds > 0
    batch4 = {m: x.expand(4, *x.shape[1:]) for m, x in inputs.items()}
    assert count_madds(task.model, batch4).madds == 4 * record["madds"]
    assert record["params"] == sum(p.numel() for p in task.model.parameters())
    assert sum(record["by_module"].values()) == record["madds"]
    assert set(record["by_module"]) >= {f"encoders.{m}" for m in dm.modalities} | {"head"}
    assert json.loads(json.dumps(record)) == record


def test_run_record_stores_compute_and_bigger_models_count_more(tmp_path):
    records = {}
    for fusion in ("concat", "tensor"):
        cfg = compose_cfg(
            ["dataset=synthetic", f"fusion={fusion}", *FAST, "trainer.max_epochs=1"],
            output_dir=tmp_path / fusion,
        )
        result, objs = train(cfg)
        with open(os.path.join(cfg.paths.output_dir, "metrics.json")) as f:
            records[fusion] = json.load(f)["compute"]
        assert records[fusion] == result["compute"] == model_compute(objs["task"].model, objs["datamodule"])
        assert records[fusion]["madds"] > 0
    # tensor fusion's head reads the outer product of all embeddings (each padded with a 1):
    # far wider than concat's
    assert records["tensor"]["madds"] > records["concat"]["madds"]
    assert records["tensor"]["by_module"]["head"] > records["concat"]["by_module"]["head"]
    fused_dim = objs["task"].model.fused_dim  # tensor: Linear(fused_dim, 32) -> ReLU -> Linear(32, 3)
    assert records["tensor"]["by_module"]["head"] == fused_dim * 32 + 32 * 3
    enc = {k: v for k, v in records["concat"]["by_module"].items() if k.startswith("encoders.")}
    assert enc == {k: v for k, v in records["tensor"]["by_module"].items() if k.startswith("encoders.")}


def test_uncountable_model_records_the_error(caplog):
    class Broken(nn.Module):
        def forward(self, inputs):
            raise RuntimeError("unsupported op")

    dm = SimpleNamespace(test_set=[{"inputs": {"x": torch.zeros(3)}, "target": torch.tensor(0)}])

    net = Broken()
    net.train()
    with caplog.at_level("WARNING", logger="fusionbench"):
        assert model_compute(net, dm) == {"error": "RuntimeError: unsupported op"}
    assert "Could not count" in caplog.text
    assert net.training and torch.backends.mha.get_fastpath_enabled()
    with pytest.raises(RuntimeError, match="unsupported op"):
        count_madds(net, {"x": torch.zeros(1, 3)})


def test_gpu_rnn_kernel_formula_agrees_with_the_cpu_one():
    """cuDNN / MIOpen RNNs take all layers' weights in one flat list; the formula (checked here on
    shapes, no GPU needed) gives the same count as the per-layer CPU kernel."""
    from fusionbench.compute import _cudnn_rnn_flop

    lstm = nn.LSTM(2, 5, num_layers=2, bidirectional=True, batch_first=True)
    shapes = [w.shape for w in lstm._flat_weights]  # W_ih, W_hh, b_ih, b_hh per layer and direction
    cpu = count_madds(lstm, torch.randn(1, 7, 2)).flops
    assert _cudnn_rnn_flop(torch.Size([1, 7, 2]), shapes) == cpu == 2 * 7 * 2 * (4 * 5 * 7 + 4 * 5 * 15)
