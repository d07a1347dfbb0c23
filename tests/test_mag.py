"""MAG-BERT / MAG-XLNet (fusionbench/fusion/mag.py): the gate's equations by hand, where the shift goes in
BERT and XLNet, gradients, the heads, errors, Pro-Fusion around it, and one run on the MAG pickle fixture.
Tiny random transformers only: no weights, no network."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, compose_cfg
from torch import nn

from fusionbench.encoders import PretrainedTextEncoder, SequenceIdentityEncoder
from fusionbench.encoders.pretrained import save_tiny_pretrained, tiny_config
from fusionbench.errors import ConfigError
from fusionbench.fusion import MAGFusion, ProFusion
from fusionbench.fusion.mag import MAG

B, L, DA, DV = 3, 7, 5, 4
LENGTHS = (7, 5, 2)  # real tokens per sample; the rest is padding


def encoders(kind: str = "bert", pool: str | None = None) -> dict[str, nn.Module]:
    pool = pool or ("pooler" if kind == "bert" else "cls")
    return {
        "audio": SequenceIdentityEncoder(DA),
        "text": PretrainedTextEncoder(config=tiny_config(kind, 64), output="sequence", pool=pool),
        "vision": SequenceIdentityEncoder(DV),
    }


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text = torch.zeros(B, 2, L, dtype=torch.long)
    for i, n in enumerate(LENGTHS):
        text[i, 0, :n] = torch.randint(5, 64, (n,), generator=g)
        text[i, 1, :n] = 1
    real = text[:, 1].unsqueeze(-1).float()  # zero features at padding, as the datasets write them
    return {
        "text": text,
        "audio": torch.randn(B, L, DA, generator=g) * real,
        "vision": torch.randn(B, L, DV, generator=g) * real,
    }


def model(kind: str = "bert", **kw) -> MAGFusion:
    torch.manual_seed(0)
    return MAGFusion(encoders(kind), 1, **kw)


# ------------------------------------------------------------------------------------------- the gate
def hand_gate(beta: float, scale_v: float) -> MAG:
    """H = 2, d_a = d_v = 1, weights set so every quantity is a small number (see the test)."""
    mag = MAG(hidden=2, audio_dim=1, vision_dim=1, beta_shift=beta, dropout=0.5).eval()
    with torch.no_grad():
        mag.W_hv.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))  # input [v; z]
        mag.W_hv.bias.copy_(torch.tensor([0.0, 0.5]))
        mag.W_ha.weight.copy_(torch.tensor([[0.0, 0.0, 0.0], [-1.0, 0.0, 0.0]]))  # input [a; z]
        mag.W_ha.bias.copy_(torch.tensor([1.0, 0.0]))
        mag.W_v.weight.copy_(torch.tensor([[1.0], [2.0]]) * scale_v)
        mag.W_v.bias.zero_()
        mag.W_a.weight.copy_(torch.tensor([[0.5], [0.0]]))
        mag.W_a.bias.zero_()
    return mag


def test_gate_shift_and_alpha_by_hand() -> None:
    z = torch.tensor([[[3.0, 4.0]]])  # ||Z|| = 5
    v, a = torch.tensor([[[1.0]]]), torch.tensor([[[2.0]]])
    # g_v = relu([1*1, 0.5]) = [1, 0.5]; g_a = relu([1, -2]) = [1, 0]; W_v v = [1, 2]; W_a a = [1, 0]
    # H = [1*1 + 1*1, 0.5*2 + 0] = [2, 1]: ||H|| = sqrt(5) < ||Z||, so alpha is clamped at 1
    out, alpha, shift = hand_gate(beta=1.0, scale_v=1.0)(z, v, a)
    assert alpha.shape == (1, 1) and alpha.item() == 1.0
    assert torch.allclose(shift, torch.tensor([[[2.0, 1.0]]]))
    assert torch.allclose(out, F.layer_norm(z + shift, (2,)))  # eval: no dropout
    # W_v ten times larger: H = [10 + 1, 0.5 * 20] = [11, 10]; alpha = beta ||Z|| / (||H|| + eps) < 1
    out, alpha, shift = hand_gate(beta=0.5, scale_v=10.0)(z, v, a)
    expected = 0.5 * 5.0 / (math.sqrt(221.0) + 1e-6)
    assert alpha.item() == pytest.approx(expected, rel=1e-6)
    assert torch.allclose(shift, expected * torch.tensor([[[11.0, 10.0]]]))
    assert shift.norm().item() == pytest.approx(0.5 * 5.0, rel=1e-5)  # the shift's norm is beta ||Z||
    assert torch.allclose(out, F.layer_norm(z + shift, (2,)))


def test_dropout_follows_the_layer_norm() -> None:
    torch.manual_seed(0)
    mag = MAG(hidden=6, audio_dim=1, vision_dim=1, dropout=0.5).train()
    z, v, a = torch.randn(1, 4, 6), torch.randn(1, 4, 1), torch.randn(1, 4, 1)
    out, _, shift = mag(z, v, a)
    ln = F.layer_norm(z + shift, (6,))
    kept = out != 0
    assert 0 < kept.sum() < out.numel()
    assert torch.allclose(out[kept], ln[kept] * 2.0)  # Dropout(LayerNorm(.)): kept values scaled by 1/(1-p)


def test_zero_audio_and_vision_give_a_text_only_shift_and_no_nan() -> None:
    torch.manual_seed(0)
    mag = MAG(hidden=6, audio_dim=3, vision_dim=2).eval()
    for lin in (mag.W_hv, mag.W_ha, mag.W_v, mag.W_a):
        nn.init.zeros_(lin.bias)  # as initialised in MAGFusion
    z = torch.randn(2, 4, 6, requires_grad=True) * torch.tensor([1.0, 0.1]).view(2, 1, 1)
    v, a = torch.zeros(2, 4, 2), torch.zeros(2, 4, 3)
    out, alpha, shift = mag(z, v, a)
    # H = 0: the code sets ||H|| = 1, so alpha = min(beta ||Z|| / (1 + eps), 1) and nothing is added ...
    assert torch.equal(shift, torch.zeros_like(shift))
    assert torch.allclose(alpha, (z.norm(dim=-1) / (1 + 1e-6)).clamp(max=1.0))
    assert (alpha[1] < 1).all()  # the small-norm sample shows the formula, not only the clamp
    # ... but MAG's LayerNorm still runs: the output is LayerNorm(Z), not Z
    assert torch.allclose(out, F.layer_norm(z, (6,)), atol=1e-6) and not torch.allclose(out, z)
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in mag.parameters() if p.grad is not None)
    # with biases (after training) zero inputs still shift Z: H = g_v * b_v + g_a * b_a, gates from Z alone
    nn.init.normal_(mag.W_v.bias)
    nn.init.normal_(mag.W_a.bias)
    nn.init.normal_(mag.W_hv.bias)
    with torch.no_grad():
        _, alpha, shift = mag(z, v, a)
        g_v = F.relu(F.linear(torch.cat((v, z), -1), mag.W_hv.weight, mag.W_hv.bias))
        g_a = F.relu(F.linear(torch.cat((a, z), -1), mag.W_ha.weight, mag.W_ha.bias))
        h = g_v * mag.W_v.bias + g_a * mag.W_a.bias
    assert h.abs().sum() > 0
    assert torch.allclose(shift, alpha.unsqueeze(-1) * h, atol=1e-6)


# ------------------------------------------------------------------------------- in the transformer
def block_outputs(text: PretrainedTextEncoder) -> tuple[list[torch.Tensor], list]:
    """Hooks after the encoder's own (so they see edited outputs): every block's (B, L, H) output."""
    seen: list[torch.Tensor] = []

    def hook(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        seen.append(h.transpose(0, 1) if text.time_major else h)

    return seen, [b.register_forward_hook(hook) for b in text.blocks]


@pytest.mark.parametrize(("kind", "block"), [("bert", 0), ("xlnet", 1)])
def test_the_shift_goes_after_the_block_of_the_public_code(kind: str, block: int) -> None:
    fusion = model(kind).eval()
    assert fusion.inject_after == block
    text, x = fusion.encoders["text"], batch()
    seen, handles = block_outputs(text)
    with torch.no_grad():
        plain = text.hidden_states(x["text"])
        plain_blocks = list(seen)
        seen.clear()
        out = fusion(x)
        shifted = fusion.encode(x)["text"]
    for h in handles:
        h.remove()
    mag_blocks = seen[: len(plain_blocks)]
    for k in range(block):  # untouched before the injection block
        assert torch.equal(mag_blocks[k], plain_blocks[k]), k
    with torch.no_grad():
        expected, alpha, _ = fusion.mag(plain_blocks[block], x["vision"], x["audio"])
    assert torch.allclose(mag_blocks[block], expected, atol=1e-6)
    assert not torch.allclose(shifted, plain, atol=1e-3)
    # the fused vector: BERT's pooler on [CLS]; XLNet's last token -> Linear -> tanh
    mask = x["text"][:, 1]
    if kind == "bert":
        pooled = text.model.pooler(shifted)
    else:
        pooled = torch.tanh(fusion.summary(shifted[:, -1]))
    assert torch.allclose(out.logits, fusion.head[1](pooled), atol=1e-6)
    assert out.logits.shape == (B, 1)
    # logged: alpha and ||alpha H|| / ||Z|| averaged over the real tokens
    w = mask.float()
    assert out.info["mag/alpha"].item() == pytest.approx(((alpha * w).sum() / w.sum()).item(), rel=1e-5)
    assert 0 < out.info["mag/alpha"] <= 1 and 0 < out.info["mag/ratio"] <= fusion.mag.beta_shift + 1e-6


def test_inject_after_can_be_moved() -> None:
    fusion = model("bert", inject_after=2).eval()
    text, x = fusion.encoders["text"], batch()
    seen, handles = block_outputs(text)
    with torch.no_grad():
        text.hidden_states(x["text"])
        plain = list(seen)
        seen.clear()
        fusion(x)
    for h in handles:
        h.remove()
    assert all(torch.equal(seen[k], plain[k]) for k in (0, 1)) and not torch.allclose(seen[2], plain[2])


@pytest.mark.parametrize("kind", ["bert", "xlnet"])
def test_gradients_reach_mag_the_transformer_and_the_head(kind: str) -> None:
    fusion = model(kind).train()
    out = fusion(batch())
    assert out.logits.shape == (B, 1) and out.aux_loss is None
    F.mse_loss(out.logits, torch.randn(B, 1)).backward()
    # XLNet without targets or segments never uses its mask embedding, segment embeddings or segment bias
    unused = ("mask_emb", "seg_embed", "r_s_bias") if kind == "xlnet" else ()
    missing = [
        n
        for n, p in fusion.named_parameters()
        if (p.grad is None or p.grad.abs().sum() == 0) and not any(u in n for u in unused)
    ]
    assert missing == []
    names = {n for n, _ in fusion.named_parameters()}
    assert {"mag.W_hv.weight", "mag.W_ha.weight", "mag.W_v.weight", "mag.W_a.weight"} <= names
    assert {"mag.LayerNorm.weight", "head.1.weight"} <= names
    assert ("summary.weight" in names) == (kind == "xlnet")


def test_new_layers_are_initialised_as_transformers_does() -> None:
    fusion = model("bert")
    for lin in (fusion.mag.W_hv, fusion.mag.W_ha, fusion.mag.W_v, fusion.mag.W_a, fusion.head[1]):
        assert torch.equal(lin.bias, torch.zeros_like(lin.bias))
        assert lin.weight.std().item() == pytest.approx(0.02, rel=0.5)
    assert fusion.head[0].p == 0.1 and fusion.mag.dropout.p == 0.5


def test_modalities_alignment_and_backbone_errors() -> None:
    enc = encoders()
    del enc["vision"]
    with pytest.raises(ConfigError, match=r"exactly the modalities \['audio', 'text', 'vision'\]"):
        MAGFusion(enc, 1)
    enc = encoders()
    enc["text"] = SequenceIdentityEncoder(8)
    with pytest.raises(ConfigError, match="PretrainedTextEncoder"):
        MAGFusion(enc, 1)
    with pytest.raises(ConfigError, match=r"inject_after=3.*blocks 0 \(embedding output\) to 2"):
        MAGFusion(encoders(), 1, inject_after=3)
    x = batch()
    x["audio"] = x["audio"][:, :4]
    with pytest.raises(ConfigError, match=r"audio aligned with the word pieces, \(batch, 7, d\)"):
        model()(x)


# ------------------------------------------------------------------------------------------ Pro-Fusion
@pytest.mark.parametrize("kind", ["bert", "xlnet"])
def test_profusion_with_zero_backprojection_is_the_base(kind: str) -> None:
    torch.manual_seed(0)
    pro = ProFusion(encoders(kind), 1, base="mag", unroll_steps=2, context_dim=4)
    assert isinstance(pro.base, MAGFusion) and sorted(pro.backproject) == ["audio", "text", "vision"]
    x = batch()
    out = pro(x)
    F.mse_loss(out.logits, torch.randn(B, 1)).backward()
    assert all(w.weight.grad is not None and w.weight.grad.abs().sum() > 0 for w in pro.backproject.values())
    pro.eval()
    with torch.no_grad():
        assert not torch.allclose(pro(x).logits, pro.base(x).logits)
        for w in pro.backproject.values():
            nn.init.zeros_(w.weight)
        assert torch.equal(pro(x).logits, pro.base(x).logits)


# ------------------------------------------------------------------------------------------ end to end
def test_mag_bert_trains_on_the_mag_pickle_fixture(make_cfg, tmp_path) -> None:
    pytest.importorskip(
        "fusionbench.data.mag", reason="the MAG dataset (fusionbench/data/mag.py) is not there"
    )
    from fusionbench.data.mag import write_fixture
    from fusionbench.data.text import FIXTURE_WORDS
    from fusionbench.train import train

    tiny = save_tiny_pretrained(tmp_path / "tiny", words=FIXTURE_WORDS)
    write_fixture(tmp_path / "mosi_mag", sizes={"train": 8, "val": 4, "test": 4})
    cfg = make_cfg(
        [
            "dataset=mosi_mag",
            "fusion=mag",
            f"paths.data_dir={tmp_path}",
            f"backbone.text.pretrained={tiny}",
            "dataset.num_samples={train: 8, val: 4, test: 4}",
            "dataset.batch_size=8",
            *FAST,
            "trainer.max_epochs=1",
        ]
    )
    assert cfg.dataset.tokenizer == str(tiny) and cfg.backbone.vision.in_features == 47
    record, objs = train(cfg)
    fusion = objs["task"].model
    assert isinstance(fusion, MAGFusion) and fusion.inject_after == 0 and fusion.summary is None
    assert (fusion.mag.W_a.in_features, fusion.mag.W_v.in_features) == (74, 47)  # widths from the data
    assert objs["trainer"].current_epoch == 1
    for key in ("test/loss", "test/mae", "test/acc2_non0", "test/mag/alpha", "test/mag/ratio"):
        assert math.isfinite(record["metrics"][key]), key
    assert 0 < record["metrics"]["test/mag/alpha"] <= 1


@pytest.mark.parametrize(
    ("dataset", "backbone", "model", "pool", "vision"),
    [
        ("mosi_mag", None, "bert-base-uncased", "pooler", 47),
        ("mosei_mag", None, "bert-base-uncased", "pooler", 35),
        ("mosi_mag", "mosi_mag_xlnet", "xlnet-base-cased", "cls", 47),
        ("mosei_mag", "mosei_mag_xlnet", "xlnet-base-cased", "cls", 35),
    ],
)
def test_backbones_compose_for_mag_bert_and_mag_xlnet(dataset, backbone, model, pool, vision) -> None:
    extra = [f"backbone={backbone}"] if backbone else []
    cfg = compose_cfg([f"dataset={dataset}", "fusion=mag", *extra, "paths.pretrained_dir=/models"])
    assert cfg.backbone.text.pretrained == f"/models/{model}" and cfg.dataset.tokenizer == f"/models/{model}"
    assert cfg.backbone.text.output == "sequence" and cfg.backbone.text.pool == pool
    assert (cfg.backbone.audio.in_features, cfg.backbone.vision.in_features) == (74, vision)
    assert cfg.fusion.inject_after is None and cfg.fusion.beta_shift == 1.0 and cfg.fusion.dropout == 0.5
