"""MUTAN and MUTAN + DEQ fusion (fusionbench/fusion/mutan.py): the Tucker fusion against hand
computations, the rank constraint, padding masks, the two glimpses, the DEQ fusion point, the paper-size
parameter count, the configs, and one training batch on the VQA fixture."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import compose_cfg
from hydra.utils import instantiate
from torch import nn

from fusionbench.encoders.identity import SequenceIdentityEncoder
from fusionbench.errors import ConfigError
from fusionbench.fusion import DEQFusion, MutanFusion
from fusionbench.fusion.mutan import TuckerFusion

try:
    from fusionbench.encoders.identity import TokenIdentityEncoder
except ImportError:  # written by the MCAN engineer; a stand-in until then

    class TokenIdentityEncoder(nn.Module):
        def __init__(self, vocab_size: int, vocab=None) -> None:
            super().__init__()
            self.vocab_size = self.output_dim = vocab_size
            self.vocab = vocab

        def forward(self, x, context=None):
            return x


TINY = dict(
    embed_dim=6,
    question_dim=8,
    att_dim_hv=5,
    att_dim_hq=5,
    att_dim_mm=7,
    att_rank=2,
    dim_hv=8,
    dim_hq=4,
    dim_mm=6,
    rank=3,
)
TINY_DEQ = dict(f_max_iter=40, b_max_iter=40, jac_weight=0.1)


def encoders(dim_v: int = 5, vocab_size: int = 11, vocab=None) -> nn.ModuleDict:
    return nn.ModuleDict(
        {"image": SequenceIdentityEncoder(dim_v), "question": TokenIdentityEncoder(vocab_size, vocab)}
    )


def model(num_outputs: int = 4, **kw) -> MutanFusion:
    torch.manual_seed(0)
    return MutanFusion(encoders(), num_outputs, **{**TINY, **kw})


def batch(
    b: int = 3, regions: int = 6, length: int = 5, dim_v: int = 5, seed: int = 1
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, regions, dim_v, generator=g)
    image[0, 4:] = 0  # padded regions
    question = torch.randint(2, 11, (b, length), generator=g)
    question[1, 3:] = 0  # padded words
    return {"image": image, "question": question}


def set_linear(layer: nn.Linear, weight, bias) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight, dtype=torch.float))
        layer.bias.copy_(torch.tensor(bias, dtype=torch.float))


# -- Tucker fusion ---------------------------------------------------------------------------------
def test_tucker_rank1_matches_a_hand_computation():
    f = TuckerFusion(dim_v=2, dim_q=2, dim_mm=2, rank=1)
    set_linear(f.proj_v, [[1, 2], [0, 1]], [0, 1])  # N_1, b_1
    set_linear(f.proj_q, [[1, 0], [1, 1]], [1, 0])  # M_1, c_1
    v, q = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0]])
    # v-side: [1 + 4 + 0, 0 + 2 + 1] = [5, 3]; q-side: [3 + 1, 3 - 1 + 0] = [4, 2]; z = [20, 6]
    assert torch.allclose(f(v, q), torch.tensor([[20.0, 6.0]]))


def test_tucker_rank2_sums_the_two_rank1_terms():
    f = TuckerFusion(dim_v=2, dim_q=2, dim_mm=2, rank=2)
    # rows 0-1: N_1 / M_1 (as in the rank-1 test); rows 2-3: N_2 / M_2
    set_linear(f.proj_v, [[1, 2], [0, 1], [1, 0], [1, 1]], [0, 1, 0, 0])
    set_linear(f.proj_q, [[1, 0], [1, 1], [0, 1], [2, 0]], [1, 0, 0, 1])
    v, q = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0]])
    # r=2: v-side [1, 3], q-side [-1, 7] -> [-1, 21]; plus r=1's [20, 6]
    assert torch.allclose(f(v, q), torch.tensor([[19.0, 27.0]]))


def test_core_tensor_slices_have_rank_at_most_R_and_give_the_bilinear_form():
    torch.manual_seed(0)
    f = TuckerFusion(dim_v=6, dim_q=5, dim_mm=4, rank=2)
    nn.init.zeros_(f.proj_v.bias), nn.init.zeros_(f.proj_q.bias)
    core = f.core_tensor()
    assert core.shape == (5, 6, 4)  # (t_q, t_v, t_o)
    assert f.proj_v.weight.shape == (2 * 4, 6) and f.proj_q.weight.shape == (2 * 4, 5)  # R maps per side
    assert all(torch.linalg.matrix_rank(core[:, :, k]) == 2 for k in range(4))  # full rank would be 5
    v, q = torch.randn(3, 6), torch.randn(3, 5)
    assert torch.allclose(f(v, q), torch.einsum("bq,qvk,bv->bk", q, core, v), atol=1e-5)


def test_tucker_broadcasts_one_question_over_regions():
    torch.manual_seed(0)
    f = TuckerFusion(4, 3, 5, 2)
    v, q = torch.randn(2, 7, 4), torch.randn(2, 1, 3)
    assert torch.allclose(f(v, q), f(v, q.expand(2, 7, 3)))


# -- the model ----------------------------------------------------------------------------------
def test_output_shape_and_fusion_width():
    m = model()
    out = m(batch())
    assert out.logits.shape == (3, 4) and out.aux_loss is None
    assert m.fused_dim == 6 and m.head[-1].in_features == 6
    assert [p.out_features for p in m.glimpse_proj] == [4, 4]  # dim_hv 8 over 2 glimpses


def test_two_glimpses_are_distributions_over_real_regions_only():
    m = model().eval()
    x = batch()
    q = m.question_vector(x["question"])
    weights, attended = m.attention(x["image"], q, x["image"].abs().sum(-1) != 0)
    assert weights.shape == (3, 2, 6) and attended.shape == (3, 2, 5)
    assert torch.allclose(weights.sum(-1), torch.ones(3, 2))
    assert (weights[0, :, 4:] == 0).all() and (weights[0, :, :4] > 0).all()
    assert not torch.allclose(weights[:, 0], weights[:, 1])  # the glimpses differ
    assert torch.allclose(attended, weights @ x["image"])


def test_padding_and_region_order_do_not_change_the_answer():
    m = model().eval()
    x = batch()
    ref = m(x).logits
    padded = {
        "image": torch.cat([x["image"], torch.zeros(3, 4, 5)], dim=1),  # more zero regions
        "question": torch.cat([x["question"], torch.zeros(3, 3, dtype=torch.long)], dim=1),  # more padding
    }
    assert torch.allclose(m(padded).logits, ref, atol=1e-5)
    perm = torch.tensor([5, 2, 0, 4, 1, 3])
    assert torch.allclose(m({**x, "image": x["image"][:, perm]}).logits, ref, atol=1e-5)
    # padded words never enter the GRU: their ids' embeddings are irrelevant
    with torch.no_grad():
        m.embed.weight[0] = 5.0
    assert torch.allclose(m(x).logits, ref, atol=1e-5)
    # an image that is all padding attends to nothing: same answer as any other all-zero image of other size
    empty = {"image": torch.zeros(3, 6, 5), "question": x["question"]}
    assert torch.isfinite(m(empty).logits).all()
    assert torch.allclose(m(empty).logits, m({**empty, "image": torch.zeros(3, 2, 5)}).logits, atol=1e-6)


def test_gradients_reach_the_gru_the_attention_and_the_classifier():
    m = model().train()
    m(batch()).logits.sum().backward()
    for name in (
        "gru.weight_hh_l0",
        "embed.weight",
        "attention.fusion.proj_v.weight",
        "attention.glimpse_logits.weight",
        "glimpse_proj.1.weight",
        "question_proj.weight",
        "fusion.proj_q.weight",
        "head.0.weight",
    ):
        grad = dict(m.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_deq_fusion_point_converges_untrained_and_trains_every_part():
    m = model(fusion_point="deq", deq_width=16, deq_args=TINY_DEQ)
    assert isinstance(m.deq, DEQFusion) and m.deq.width == 16 and m.fused_dim == 16
    assert isinstance(m.deq.head, nn.Identity) and not hasattr(m, "fusion")
    assert m.question_proj.out_features == 16 and [p.out_features for p in m.glimpse_proj] == [8, 8]
    m.train()
    out = m(batch())
    assert out.logits.shape == (3, 4)
    # the untrained layer reaches its fixed point (paper size on CPU, random inputs: rel. residual ~1e-3)
    assert float(out.info["deq/rel_residual"]) < 1e-2 and float(out.info["deq/f_failed"]) == 0
    assert out.aux_loss is not None  # the Jacobian penalty
    (out.logits.sum() + out.aux_loss).backward()
    params = dict(m.named_parameters())
    for name in (
        "gru.weight_ih_l0",
        "attention.proj_q.weight",
        "attention.glimpse_logits.weight",
        "deq.fuse_lin.weight",
        "deq.lin1.weight",
        "deq.gate.weight",
        "head.0.weight",
    ):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name


def test_deq_width_defaults_to_the_image_width_and_accepts_a_partial():
    from functools import partial

    m = model(fusion_point="deq", deq_args=partial(DEQFusion, f_max_iter=7))
    assert m.deq.width == TINY["dim_hv"] and m.deq.f_max_iter == 7


def test_errors_say_what_to_change():
    with pytest.raises(ConfigError, match="deq_args is set but fusion.fusion_point=mutan"):
        model(deq_args={})
    with pytest.raises(ConfigError, match="fusion_point='sum' is not one of"):
        model(fusion_point="sum")
    with pytest.raises(ConfigError, match="deq_width=9 must be divisible by fusion.glimpses=2"):
        model(fusion_point="deq", deq_width=9)
    with pytest.raises(ConfigError, match="fuses the modalities"):
        MutanFusion(nn.ModuleDict({"image": SequenceIdentityEncoder(5)}), 4)
    with pytest.raises(ConfigError, match="needs the vocabulary's words"):
        model(glove_file="glove.txt")


def test_glove_initialises_the_vocabulary_words(tmp_path):
    vocab = ["PAD", "UNK", "what", "dog"] + [f"w{i}" for i in range(7)]
    path = tmp_path / "glove.txt"
    path.write_text("dog 1 2 3 4 5 6\nzebra 0 0 0 0 0 0\nwhat -1 -1 -1 -1 -1 -1\n")
    torch.manual_seed(0)
    m = MutanFusion(encoders(vocab=vocab), 4, glove_file=str(path), **TINY)
    assert m.embed.weight[3].tolist() == [1, 2, 3, 4, 5, 6] and m.embed.weight[2].tolist() == [-1] * 6
    assert (m.embed.weight[0] == 0).all()
    path.write_text("dog 1 2 3\n")
    with pytest.raises(ConfigError, match="3-d vectors but fusion.embed_dim=6"):
        MutanFusion(encoders(vocab=vocab), 4, glove_file=str(path), **TINY)


def count_paper_size(vocab: int, answers: int) -> int:
    """mutan_att_trainval.yaml: dim_v 2048, dim_q 2400 (GRU 300 -> 2400 here), attention 310/310/510 R 5,
    2 glimpses, final fusion 620 (2 x 310)/310/510 R 5, classifier 510 -> answers; every Linear has a bias."""

    def lin(i, o):
        return i * o + o

    embed = vocab * 300
    gru = 3 * (300 * 2400 + 2400 * 2400 + 2 * 2400)
    attention = lin(2048, 310) + lin(2400, 310) + 5 * (lin(310, 510) + lin(310, 510)) + lin(510, 2)
    final = 2 * lin(2048, 310) + lin(2400, 310) + 5 * (lin(620, 510) + lin(310, 510))
    return embed + gru + attention + final + lin(510, answers)


def test_paper_size_parameter_count():
    m = MutanFusion(encoders(dim_v=2048, vocab_size=1000), 3129)
    n = sum(p.numel() for p in m.parameters())
    assert n == count_paper_size(1000, 3129) == 28_711_231


# -- configs and training ------------------------------------------------------------------------
def tiny_fusion_overrides() -> list[str]:
    return [f"fusion.{k}={v}" for k, v in TINY.items()]


def test_configs_compose_and_build():
    cfg = compose_cfg(["fusion=mutan"])
    assert cfg.fusion._target_ == "fusionbench.fusion.MutanFusion" and cfg.fusion.fusion_point == "mutan"
    assert cfg.fusion.deq_args is None and cfg.fusion.rank == 5 and cfg.fusion.glimpses == 2
    cfg = compose_cfg(["fusion=mutan_deq", *tiny_fusion_overrides(), "fusion.deq_args.f_max_iter=12"])
    assert cfg.fusion.fusion_point == "deq" and cfg.fusion.deq_args._target_ == "fusionbench.fusion.DEQFusion"
    m = instantiate(cfg.fusion, encoders=encoders(), num_outputs=4, _convert_="all")
    assert isinstance(m.deq, DEQFusion) and m.deq.f_max_iter == 12 and m.deq.width == 8
    assert m(batch()).logits.shape == (3, 4)


def vqa_ready() -> str | None:
    if importlib.util.find_spec("fusionbench.data.vqa") is None:
        return "fusionbench/data/vqa.py is not there yet"
    from fusionbench import ROOT

    for f in ("configs/dataset/vqa.yaml", "configs/backbone/vqa.yaml"):
        if not (ROOT / f).is_file():
            return f"{f} is not there yet"
    return None


@pytest.mark.parametrize("fusion", ["mutan", "mutan_deq"])
def test_trains_one_batch_on_the_vqa_fixture(fusion, tmp_path):
    reason = vqa_ready()
    if reason:
        pytest.skip(reason)
    from fusionbench import ROOT
    from fusionbench.data.vqa import write_fixture
    from fusionbench.task import task_loss
    from fusionbench.train import build

    answers = ROOT.parent / "shared/data/vqa_v2/mcan_answer_dict.json"  # MCAN's 3129 answers, when present
    write_fixture(tmp_path / "vqa", answer_dict=answers if answers.is_file() else None)
    cfg = compose_cfg(
        [
            "dataset=vqa",
            f"dataset.data_dir={tmp_path / 'vqa'}",
            "dataset.num_samples=null",
            "dataset.batch_size=4",
            "dataset.num_workers=0",
            f"dataset.verify_checksums={answers.is_file()}",
            "backbone=vqa",
            f"fusion={fusion}",
            *tiny_fusion_overrides(),
        ],
        tmp_path / "run",
    )
    dm, task = build(cfg)
    assert task.task_type == "vqa"
    b = next(iter(dm.train_dataloader()))
    assert b["inputs"]["image"].shape[1:] == (100, 2048) and b["inputs"]["question"].shape[1:] == (14,)
    opt = torch.optim.Adam(task.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in task.model.gru.parameters()]
    out = task.model(b["inputs"])
    assert out.logits.shape == (4, dm.num_outputs) and dm.num_outputs == (3129 if answers.is_file() else 10)
    loss = task_loss("vqa", out.logits, b["target"])
    (loss + (out.aux_loss if out.aux_loss is not None else 0)).backward()
    opt.step()
    assert torch.isfinite(loss) and any(
        not torch.equal(a, p) for a, p in zip(before, task.model.gru.parameters())
    )


def test_deq_diagnostics_trace_the_deq_layer_inside_mutan():
    """The convergence trace of the DEQ layer at Mutan's fusion point (and none without it)."""
    import torch

    from fusionbench.fusion import MutanFusion
    from fusionbench.fusion.deq.callbacks import deq_diagnostics

    torch.manual_seed(0)
    x = {"image": torch.rand(2, 6, 5), "question": torch.tensor([[3, 4, 5, 0], [6, 7, 0, 0]])}
    deq = MutanFusion(encoders(), 7, fusion_point="deq", deq_args=TINY_DEQ, **TINY).eval()
    trace = deq_diagnostics(deq, x, steps=15)
    assert trace["mode"] == "deq" and len(trace["iteration_rel_diff"]) == 15
    assert trace["iteration_rel_diff"][-1] < trace["iteration_rel_diff"][0]
    assert deq_diagnostics(MutanFusion(encoders(), 7, **TINY).eval(), x, steps=5) is None
