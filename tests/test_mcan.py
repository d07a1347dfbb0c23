"""MCAN and MCAN + DEQ fusion (fusionbench/fusion/mcan.py): shapes, padding masks, AttFlat by hand, the DEQ
fusion point (convergence, gradients), the paper sizes' parameter counts, GloVe initialisation, MCAN's LR
schedule, and one training run on the VQA fixture through the real configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from fusionbench.encoders import SequenceIdentityEncoder
from fusionbench.encoders.identity import TokenIdentityEncoder
from fusionbench.errors import ConfigError
from fusionbench.fusion import DEQFusion, MCANFusion
from fusionbench.fusion.mcan import AttFlat
from fusionbench.schedules import mcan_schedule

TINY = dict(hidden=16, heads=2, ff=32, layers=1, flat_mlp=8, flat_glimpses=1, flat_out=16, dropout=0.0)
FEAT, VOCAB, L, N = 24, 30, 14, 12


def tiny(feat: int = FEAT, vocab: int = VOCAB, num_outputs: int = 7, **kw) -> MCANFusion:
    torch.manual_seed(0)
    encoders = {"image": SequenceIdentityEncoder(feat), "question": TokenIdentityEncoder(vocab)}
    return MCANFusion(encoders, num_outputs, **(TINY | kw)).eval()


def batch(b: int = 3, lengths=(5, 14, 2), boxes=(4, 12, 7), seed: int = 1) -> dict[str, torch.Tensor]:
    """Questions of ``lengths`` real words then 0s; images of ``boxes`` nonzero rows then zero rows."""
    g = torch.Generator().manual_seed(seed)
    q = torch.zeros(b, L, dtype=torch.long)
    img = torch.zeros(b, N, FEAT)
    for i in range(b):
        q[i, : lengths[i]] = torch.randint(1, VOCAB, (lengths[i],), generator=g)
        img[i, : boxes[i]] = torch.rand(boxes[i], FEAT, generator=g) + 0.01
    return {"image": img, "question": q}


def test_output_shape_and_full_answer_vocabulary():
    x = batch()
    out = tiny(num_outputs=3129)(x)
    assert out.logits.shape == (3, 3129) and out.aux_loss is None and out.info == {}
    assert torch.isfinite(out.logits).all()


def test_padding_does_not_change_the_output():
    model, x = tiny(), batch(lengths=(5, 9, 2), boxes=(4, 9, 7))
    with torch.no_grad():
        ref = model(x).logits
        # fewer padded words and boxes (every sample keeps its own): the same answer scores
        trimmed = model({"image": x["image"][:, :9], "question": x["question"][:, :9]}).logits
        assert torch.allclose(trimmed, ref, atol=1e-5)
        more = {"image": torch.cat([x["image"], torch.zeros(3, 20, FEAT)], 1), "question": x["question"]}
        assert torch.allclose(model(more).logits, ref, atol=1e-5)
        # ids 0 reach the LSTM, but its states there are masked everywhere: the pad embedding is irrelevant
        model.embedding.weight[0].normal_(mean=3.0)
        assert torch.allclose(model(x).logits, ref, atol=1e-5)
        # a real word or box in a padded slot does change the sample's scores
        q = x["question"].clone()
        q[0, 5] = 3
        assert not torch.allclose(model({"image": x["image"], "question": q}).logits[0], ref[0])
        img = x["image"].clone()
        img[0, 6] = 1.0
        assert not torch.allclose(model({"image": img, "question": x["question"]}).logits[0], ref[0])


def test_attflat_against_a_hand_computation():
    flat = AttFlat(hidden=2, mlp=1, glimpses=1, out=2, dropout=0.0)
    with torch.no_grad():
        flat.mlp[0].weight.copy_(torch.tensor([[1.0, 0.0]]))  # score = ReLU(z_0) * 2 + 0
        flat.mlp[0].bias.zero_()
        flat.mlp[3].weight.fill_(2.0)
        flat.mlp[3].bias.zero_()
        flat.merge.weight.copy_(torch.eye(2))
        flat.merge.bias.copy_(torch.tensor([0.5, -0.5]))
    z = torch.tensor([[[1.0, 2.0], [0.0, 4.0], [9.0, 9.0]]])  # third row padded
    mask = torch.tensor([[False, False, True]])
    # scores 2, 0 (the padded 18 is masked): weights e^2 / (e^2 + 1), 1 / (e^2 + 1)
    a = math.exp(2) / (math.exp(2) + 1)
    expected = torch.tensor([[a * 1 + (1 - a) * 0 + 0.5, a * 2 + (1 - a) * 4 - 0.5]])
    assert torch.allclose(flat(z, mask), expected, atol=1e-6)
    # two glimpses: the pooled vectors are concatenated before the merge
    flat2 = AttFlat(hidden=2, mlp=3, glimpses=2, out=3, dropout=0.0)
    att = flat2.mlp(z).masked_fill(mask[:, :, None], -1e9).softmax(1)
    pooled = torch.cat([(att[:, :, g : g + 1] * z).sum(1) for g in range(2)], dim=1)
    assert torch.allclose(flat2(z, mask), flat2.merge(pooled), atol=1e-6)


def test_sum_fusion_is_layernorm_of_the_attflat_sum():
    model, x = tiny(), batch()
    with torch.no_grad():
        image, question = model.features(x["image"], x["question"])
        f = image + question
        ln = (f - f.mean(-1, keepdim=True)) / (f.std(-1, keepdim=True) + 1e-6)  # MCAN's LN, unbiased std
        assert torch.allclose(model(x).logits, model.head[1](ln), atol=1e-5)


DEQ_ARGS = dict(f_max_iter=40, b_max_iter=40, f_tol=1e-4, groups=4, jac_weight=0.5)


def test_deq_fusion_point_converges_and_trains_every_part():
    model, x = tiny(fusion_point="deq", deq_args=DEQ_ARGS), batch()
    assert isinstance(model.deq, DEQFusion) and model.deq.modalities == ["image", "question"]
    assert isinstance(model.deq.head, nn.Identity)  # MCAN's head is used
    with torch.no_grad():
        out = model(x)
    assert (
        out.logits.shape == (3, 7) and out.info["deq/rel_residual"] < 1e-3 and out.info["deq/f_failed"] == 0
    )
    model.train()
    out = model(x)
    assert out.aux_loss is not None and out.aux_loss > 0 and "deq/jac_loss" in out.info
    (out.logits.sum() + out.aux_loss).backward()
    grads = {
        "lstm": model.lstm.weight_ih_l0,
        "embedding": model.embedding.weight,
        "image_proj": model.image_proj.weight,
        "SA": model.encoder_layers[0].att.q.weight,
        "SGA": model.decoder_layers[0].guided_att.k.weight,
        "attflat": model.flat_image.merge.weight,
        "deq_fuse": model.deq.fuse_lin.weight,
        "deq_block": model.deq.lin1.weight,
        "deq_gate": model.deq.gate.weight,
        "head": model.head[1].weight,
    }
    for name, p in grads.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == []


def test_deq_replaces_the_sum():
    model, x = tiny(fusion_point="deq", deq_args=DEQ_ARGS), batch()
    with torch.no_grad():
        image, question = model.features(x["image"], x["question"])
        z, _, _ = model.deq.combine({"image": image, "question": question})
        fused = model.step(x).fused
    assert torch.allclose(fused, z, atol=1e-5) and not torch.allclose(fused, image + question)


def test_config_errors():
    with pytest.raises(ConfigError, match="fusion.size='medium' is not one of"):
        tiny(size="medium")
    with pytest.raises(ConfigError, match="fusion_point=sum"):
        tiny(deq_args={"f_max_iter": 3})
    with pytest.raises(ConfigError, match="divisible by fusion.heads=3"):
        tiny(heads=3)
    with pytest.raises(ConfigError, match="image and question"):
        MCANFusion({"text": SequenceIdentityEncoder(4), "question": TokenIdentityEncoder(5)}, 3)
    with pytest.raises(ConfigError, match="vocabulary size"):
        TokenIdentityEncoder(None)
    with pytest.raises(ConfigError, match="question vocabulary"):
        tiny(glove_file="glove.txt")


def test_glove_initialisation(tmp_path):
    vocab = ["PAD", "UNK", "what", "dog", "zxqv"]
    glove = tmp_path / "glove.txt"
    glove.write_text("the 9 9 9\nwhat 1 2 3\ndog 0.5 -1 2\nPAD 7 7 7\n")
    encoders = {"image": SequenceIdentityEncoder(FEAT), "question": TokenIdentityEncoder(5, vocab=vocab)}
    model = MCANFusion(encoders, 3, word_dim=3, glove_file=str(glove), **TINY)
    expected = torch.tensor([[0, 0, 0], [0, 0, 0], [1, 2, 3], [0.5, -1, 2], [0, 0, 0]])  # pad/unk/unknown: 0
    assert torch.equal(model.embedding.weight.detach(), expected)
    with pytest.raises(ConfigError, match="does not exist"):
        MCANFusion(encoders, 3, word_dim=3, glove_file=str(tmp_path / "missing.txt"), **TINY)


def mcan_params(hidden, ff, layers, flat_mlp, glimpses, flat_out, vocab, answers=3129, word=300, feat=2048):
    """MCAN's parameter count from its layer list (net.py, mca.py), independent of the module."""
    linear = lambda i, o: i * o + o  # noqa: E731
    lstm = 4 * hidden * (word + hidden) + 8 * hidden  # weight_ih, weight_hh, two biases
    mha = 4 * linear(hidden, hidden)
    ffn = linear(hidden, ff) + linear(ff, hidden)
    ln = 2 * hidden
    sa, sga = mha + ffn + 2 * ln, 2 * mha + ffn + 3 * ln
    attflat = linear(hidden, flat_mlp) + linear(flat_mlp, glimpses) + linear(hidden * glimpses, flat_out)
    head = 2 * flat_out + linear(flat_out, answers)
    return vocab * word + lstm + linear(feat, hidden) + layers * (sa + sga) + 2 * attflat + head


def deq_params(d, n=2):
    """DEQFusion's layer over n inputs of width d (fusionbench/fusion/deq/model.py), without its head."""
    return n + n * 2 * d + 2 * (n * d * d + n * d) + 3 * n * 2 * d + 2 * (d * d + d) + 2 * d


def count(vocab: int, **kw) -> int:
    with torch.device("meta"):  # no memory for the 200M-parameter large model
        encoders = {"image": SequenceIdentityEncoder(2048), "question": TokenIdentityEncoder(vocab)}
        model = MCANFusion(encoders, 3129, **kw)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "size, expected_wo_embedding",
    [("small", 51_640_891), ("large", 195_551_291)],  # hand sums: see the report / docstring arithmetic
)
def test_paper_size_parameter_counts(size, expected_wo_embedding):
    vocab = 20_000
    sizes = dict(
        small=dict(hidden=512, ff=2048, layers=6, flat_mlp=512, glimpses=1, flat_out=1024),
        large=dict(hidden=1024, ff=4096, layers=6, flat_mlp=512, glimpses=1, flat_out=2048),
    )[size]
    formula = mcan_params(**sizes, vocab=vocab)
    assert formula - vocab * 300 == expected_wo_embedding
    assert count(vocab, size=size) == formula
    deq = count(vocab, size=size, fusion_point="deq", deq_args={"f_max_iter": 2})
    assert deq == formula + deq_params(sizes["flat_out"])


def test_mcan_schedule_follows_the_code():
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=1e-4)
    per_epoch = 5
    sched = mcan_schedule(opt, total_steps=13 * per_epoch, epochs=13)
    lrs = []
    for _ in range(13 * per_epoch):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    by_epoch = [lrs[e * per_epoch : (e + 1) * per_epoch] for e in range(13)]
    expected = [0.25, 0.5, 0.75] + [1.0] * 7 + [0.2, 0.2, 0.04]
    for e, (got, want) in enumerate(zip(by_epoch, expected, strict=True)):
        assert got == pytest.approx([1e-4 * want] * per_epoch), e


# -- end to end ------------------------------------------------------------------------------------------
VQA_DATA = Path(__file__).parents[1] / "fusionbench" / "data" / "vqa.py"


@pytest.mark.parametrize("fusion", ["mcan", "mcan_deq"])
def test_mcan_trains_on_the_vqa_fixture(fusion, make_cfg, tmp_path):
    if not VQA_DATA.is_file():
        pytest.skip("fusionbench/data/vqa.py (the VQA datamodule) is not there yet")
    from fusionbench.data import vqa as vqa_data
    from fusionbench.train import train

    vqa_data.write_fixture(tmp_path / "vqa_v2", n_images=4, n_questions=8, seed=0)
    cfg = make_cfg(
        [
            "dataset=vqa",
            f"fusion={fusion}",
            f"paths.data_dir={tmp_path}",
            "dataset.num_samples=null",
            "dataset.verify_checksums=false",
            "dataset.batch_size=4",
            "dataset.num_workers=0",
            *[f"fusion.{k}={v}" for k, v in TINY.items()],
            "optimizer.lr=1e-4",
            "+optimizer.betas=[0.9,0.98]",
            "+optimizer.eps=1e-9",
            "scheduler={_target_: fusionbench.schedules.mcan_schedule, _partial_: true, epochs: 1}",
            "scheduler_interval=step",
            "trainer.enable_progress_bar=false",
            "logger=none",
            "trainer.max_epochs=1",
            "+trainer.limit_train_batches=1",
            "+trainer.limit_val_batches=1",
            "+trainer.limit_test_batches=1",
        ]
    )
    assert cfg.backbone.question._target_.endswith("TokenIdentityEncoder")
    record, objs = train(cfg)
    model = objs["task"].model
    assert isinstance(model, MCANFusion) and model.vocab_size == len(objs["datamodule"].vocab)
    assert objs["trainer"].global_step == 1
    keys = ["test/vqa_acc", "test/loss"] + (["test/deq/rel_residual"] if fusion == "mcan_deq" else [])
    for key in keys:
        assert math.isfinite(record["metrics"][key]), key


def test_deq_diagnostics_trace_the_deq_layer_inside_mcan():
    """`diagnostics.json` (Table 8 style traces) for the DEQ layer at MCAN's fusion point: on the two AttFlat
    vectors the solver's residual falls below 1e-2 (plain iteration of the untrained layer does not: it is not
    yet a contraction, which is why DEQ uses a root solver); MCAN without DEQ has nothing to trace."""
    from fusionbench.fusion.deq.callbacks import deq_diagnostics

    x = batch()
    trace = deq_diagnostics(tiny(fusion_point="deq", deq_args={"f_max_iter": 30}), x, steps=20)
    rel, solver = trace["iteration_rel_diff"], trace["solver_rel_residual"]
    assert trace["mode"] == "deq" and trace["batch_size"] == 3 and len(rel) == 20
    assert all(math.isfinite(v) for v in rel) and min(v for v in solver if v is not None) < 1e-2
    assert deq_diagnostics(tiny(), x, steps=5) is None
