"""AV-MNIST Table 1 baselines of Pro-Fusion (Refnet, MFM, MFAS, gradient blending, MBT): shapes on
AV-MNIST-shaped batches, auxiliary losses, gradients to every parameter, hand-computed pieces, and
that Pro-Fusion wraps each one (zero back-projection = exactly the base model)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fusionbench.encoders import LeNetEncoder, MLPEncoder
from fusionbench.encoders.patch import PatchEncoder
from fusionbench.errors import ConfigError
from fusionbench.fusion import GradientBlendFusion, MBTFusion, MFASFusion, MFMFusion, ProFusion, RefNetFusion
from fusionbench.fusion.gradient_blend import blend_weights_from_losses
from fusionbench.fusion.mfm import delenet_depth, reconstruction_loss
from fusionbench.fusion.profusion import build_base

B = 4
SHAPES = {"image": [1, 28, 28], "audio": [1, 112, 112]}


def lenet_encoders() -> nn.ModuleDict:
    """The AV-MNIST backbone (configs/backbone/avmnist.yaml): image LeNet -> 48, audio LeNet -> 192."""
    torch.manual_seed(0)
    return nn.ModuleDict(
        {
            "image": LeNetEncoder(in_channels=1, channels=6, extra_layers=3),
            "audio": LeNetEncoder(in_channels=1, channels=6, extra_layers=5),
        }
    )


def patch_encoders() -> nn.ModuleDict:
    """configs/backbone/avmnist_mbt.yaml: 7x7 image patches, 16x16 audio patches, width 64."""
    torch.manual_seed(0)
    return nn.ModuleDict(
        {
            "image": PatchEncoder(in_channels=1, image_size=28, patch_size=7, dim=64),
            "audio": PatchEncoder(in_channels=1, image_size=112, patch_size=16, dim=64),
        }
    )


def batch(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.rand(B, *s, generator=g) for m, s in SHAPES.items()}


def targets() -> torch.Tensor:
    return torch.tensor([0, 3, 7, 9])


def no_grad_params(model: nn.Module, allowed: set[str] = frozenset()) -> list[str]:
    return [
        n
        for n, p in model.named_parameters()
        if n not in allowed
        and (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)
    ]


def total_loss(model: nn.Module, out) -> torch.Tensor:
    """What `FusionTask` minimises: the task loss plus the model's aux_loss."""
    loss = nn.functional.cross_entropy(out.logits, targets())
    if out.aux_loss is not None:
        loss = loss + out.aux_loss
    if hasattr(model, "target_loss"):
        loss = loss + model.target_loss(out, targets())
    return loss


# name -> (base_args for configs/fusion/<name>.yaml, parameters that get no gradient);
# backbone: LeNet but for MBT
BASES = {
    "refnet": ({"input_shapes": SHAPES}, set()),
    "mfm": ({"input_shapes": SHAPES}, set()),
    "mbt": ({}, set()),
    "gradient_blend": ({}, set()),
    "mfas": ({}, set()),  # encoders truncated after the last fused block: every parameter trains
}


WITH_AUX = {"refnet", "mfm"}  # reconstruction terms; GB's unimodal terms come from target_loss


def backbone(name: str) -> nn.ModuleDict:
    return patch_encoders() if name == "mbt" else lenet_encoders()


def build(name: str, **extra) -> nn.Module:
    args, _ = BASES[name]
    return build_base(name, backbone(name), 10, {**args, **extra})


# --------------------------------------------------------------------------------------------- all


@pytest.mark.parametrize("name", sorted(BASES))
def test_config_builds_shapes_and_every_parameter_learns(name):
    model = build(name)
    out = model(batch())
    assert out.logits.shape == (B, 10)
    assert torch.isfinite(out.logits).all()
    if name in WITH_AUX:
        assert out.aux_loss.ndim == 0 and torch.isfinite(out.aux_loss) and out.aux_loss > 0
    else:
        assert out.aux_loss is None
    total_loss(model, out).backward()
    assert no_grad_params(model, BASES[name][1]) == []


@pytest.mark.parametrize("name", sorted(BASES))
def test_profusion_wraps_it_and_zero_backprojection_is_the_base(name):
    args, unused = BASES[name]
    torch.manual_seed(0)
    model = ProFusion(backbone(name), 10, base=name, base_args=args, unroll_steps=2)
    x = batch()
    out = model(x)
    assert out.logits.shape == (B, 10)
    assert (out.aux_loss is not None) == (name in WITH_AUX)  # the last step carries the base's aux loss
    total_loss(model, out).backward()
    assert all(
        w.weight.grad is not None and w.weight.grad.abs().sum() > 0 for w in model.backproject.values()
    )
    assert no_grad_params(model, {f"base.{n}" for n in unused}) == []
    for w in model.backproject.values():
        nn.init.zeros_(w.weight)
    model.eval()
    with torch.no_grad():
        wrapped, base = model(x), model.base(x)
    assert torch.equal(wrapped.logits, base.logits)
    if base.aux_loss is not None:
        assert torch.equal(wrapped.aux_loss, base.aux_loss)


# ---------------------------------------------------------------------------------------- Refnet


def test_refnet_sizes_follow_multibench():
    model = build("refnet")
    assert model.fused_dim == 384 and list(model.project) == ["image"]
    assert (model.project["image"].in_features, model.project["image"].out_features) == (48, 192)
    assert [m.out_features for m in model.refiner if isinstance(m, nn.Linear)] == [1000, 784 + 12544]
    assert [m.out_features for m in model.head if isinstance(m, nn.Linear)] == [100, 10]


def test_refnet_aux_loss_is_weighted_cosine_embedding_loss():
    model = build("refnet")
    out = model(batch())
    assert out.aux_loss is not None and torch.isfinite(out.aux_loss) and out.aux_loss > 0
    terms = [out.info["refnet/cos_audio"], out.info["refnet/cos_image"]]
    assert torch.allclose(out.aux_loss, 0.1 * sum(terms))


def test_refnet_cosine_term_by_hand():
    """Refiner output fixed: audio slice = 2 * input (cos 1 -> 0), image slice orthogonal (cos 0 -> 1)."""
    model = build("refnet", ref_weight=0.5)
    x = batch()
    flat = {m: x[m].reshape(B, -1) for m in SHAPES}
    image_orth = torch.zeros(B, 784)
    image_orth[:, 0] = 1.0
    flat_image = flat["image"].clone()
    flat_image[:, 0] = 0.0  # orthogonal to e_0
    x["image"] = flat_image.reshape(B, 1, 28, 28)
    fixed = torch.cat([2 * flat["audio"], image_orth], dim=1)  # sorted order: audio, then image

    class Fixed(nn.Module):
        def forward(self, h):
            return fixed

    model.refiner = Fixed()
    terms = model.cosine_terms(torch.zeros(B, 384), x)
    assert torch.allclose(terms["audio"], torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(terms["image"], torch.tensor(1.0), atol=1e-6)
    assert torch.allclose(model.step(x).aux_loss, torch.tensor(0.5), atol=1e-6)


def test_refnet_needs_input_shapes_for_lenet_and_checks_them():
    with pytest.raises(ConfigError, match="input_shapes"):
        RefNetFusion(lenet_encoders(), 10)
    model = RefNetFusion(lenet_encoders(), 10, input_shapes={"image": [1, 28, 28], "audio": [1, 56, 56]})
    with pytest.raises(ConfigError, match="input_shapes"):
        model(batch())
    assert math.prod(SHAPES["audio"]) == 12544


# ------------------------------------------------------------------------------------------- MFM


def test_mfm_sizes_follow_multibench():
    model = build("mfm")
    assert {m: (lin.in_features, lin.out_features) for m, lin in model.to_latent.items()} == {
        "audio": (192, 200),
        "image": (48, 200),
    }
    assert [m.out_features for m in model.joint if isinstance(m, nn.Linear)] == [200, 100]
    assert [m.out_features for m in model.head if isinstance(m, nn.Linear)] == [40, 10]
    assert [m.out_features for m in model.private["image"] if isinstance(m, nn.Linear)] == [100, 100]
    assert (delenet_depth(28), delenet_depth(112)) == (3, 5)
    assert (model.decoders["image"].out_side, model.decoders["audio"].out_side) == (
        34,
        130,
    )  # MultiBench's crops
    model.eval()
    x = batch()
    with torch.no_grad():
        embeddings = model.encode(x)
        recon = model.reconstruct(embeddings, model.fuse(embeddings))
    assert {m: list(r.shape[1:]) for m, r in recon.items()} == SHAPES


def test_mfm_aux_loss_is_reconstruction_over_ce_weight():
    model = build("mfm")
    out = model(batch())
    terms = [out.info["mfm/recon_audio"], out.info["mfm/recon_image"]]
    assert all(torch.isfinite(t) and t > 0 for t in terms)
    assert torch.allclose(out.aux_loss, (terms[0] + terms[1]) / 2.0)


def test_mfm_reconstruction_losses_by_hand():
    x = torch.tensor([[0.0, 1.0, 0.25]])
    zero = torch.zeros(1, 3)
    assert torch.allclose(reconstruction_loss(zero, x, "bce"), torch.tensor(math.log(2.0)))
    assert torch.allclose(reconstruction_loss(zero, x, "mse"), ((0.5 - x) ** 2).mean())
    # MultiBench: BCE(prediction sigmoid(x), target sigmoid(logits)), linear in the target
    s = torch.sigmoid(x)
    expected = (-0.5 * torch.log(s) - 0.5 * torch.log(1 - s)).mean()
    assert torch.allclose(reconstruction_loss(zero, x, "multibench"), expected)
    assert reconstruction_loss(torch.full((1, 3), 5.0), x, "multibench") < reconstruction_loss(
        zero, x, "multibench"
    )


def test_mfm_rejects_unknown_recon_loss():
    with pytest.raises(ConfigError, match="recon_loss"):
        MFMFusion(lenet_encoders(), 10, recon_loss="l1", input_shapes=SHAPES)


# ------------------------------------------------------------------------------------------ MFAS


def test_mfas_cells_fuse_figure_10_layers():
    model = build("mfas")
    assert model.layers == {"image": [1, 2], "audio": [3, 4]}
    assert [c[0].in_features for c in model.cells] == [48 + 12, 96 + 24 + 16]  # A4+I2, then A5+I3+h1
    assert model.fused_dim == 16 and [m.out_features for m in model.head if isinstance(m, nn.Linear)] == [10]


def test_mfas_fusion_by_hand():
    model = build("mfas", activations=["relu", "sigmoid"])
    g = torch.Generator().manual_seed(3)
    feats = {
        m: [torch.randn(B, w, generator=g) for w in model.encoders[m].widths] for m in ("audio", "image")
    }
    (w1, b1), (w2, b2) = [(c[0].weight, c[0].bias) for c in model.cells]
    h1 = torch.relu(torch.cat([feats["audio"][3], feats["image"][1]], 1) @ w1.T + b1)
    h2 = torch.sigmoid(torch.cat([feats["audio"][4], feats["image"][2], h1], 1) @ w2.T + b2)
    assert torch.allclose(model.fuse_layers(feats), h2, atol=1e-6)


def test_mfas_step_uses_the_encoders_layer_outputs():
    model = build("mfas").eval()
    x = batch()
    with torch.no_grad():
        feats = {m: model.encoders[m].layer_outputs(x[m]) for m in ("audio", "image")}
        step = model.step(x)
        assert torch.equal(step.fused, model.fuse_layers(feats))
        assert {m: e.shape[1] for m, e in step.embeddings.items()} == {"audio": 96, "image": 24}  # truncated
        assert [len(model.encoders[m].convs) for m in ("audio", "image")] == [5, 3]
        assert torch.equal(step.embeddings["image"], model.encoders["image"](x["image"]))


def test_mfas_needs_layered_encoders_and_valid_layers():
    mlps = nn.ModuleDict({"image": MLPEncoder(784, [8]), "audio": MLPEncoder(12544, [8])})
    with pytest.raises(ConfigError, match="layer_outputs"):
        MFASFusion(mlps, 10)
    with pytest.raises(ConfigError, match="blocks 0..3"):
        MFASFusion(lenet_encoders(), 10, layers={"image": [1, 4], "audio": [3, 4]})
    with pytest.raises(ConfigError, match="cells"):
        MFASFusion(lenet_encoders(), 10, layers={"image": [1], "audio": [3]})


# -------------------------------------------------------------------------------- gradient blend


def test_gb_heads_follow_multibench():
    model = build("gradient_blend")
    assert model.fused_dim == 240 and model.heads == ["audio", "image", "fused"]
    assert [(lin.in_features, lin.out_features) for lin in model.head if isinstance(lin, nn.Linear)] == [
        (240, 100),
        (100, 10),
    ]
    assert [
        (lin.in_features, lin.out_features) for lin in model.uni_heads["image"] if isinstance(lin, nn.Linear)
    ] == [(48, 100), (100, 10)]
    assert [
        (lin.in_features, lin.out_features) for lin in model.uni_heads["audio"] if isinstance(lin, nn.Linear)
    ] == [(192, 100), (100, 10)]
    assert torch.allclose(model.blend_weights, torch.full((3,), 1 / 3))
    assert "blend_weights" in model.state_dict()


def test_gb_task_plus_target_loss_is_the_blended_loss():
    model = build("gradient_blend", init_weights={"audio": 2.0, "image": 3.0, "fused": 5.0})
    assert torch.allclose(model.blend_weights, torch.tensor([0.2, 0.3, 0.5]))
    out = model(batch())
    ce = nn.functional.cross_entropy
    uni = out.extras["uni_logits"]
    expected = (
        0.5 * ce(out.logits, targets())
        + 0.2 * ce(uni["audio"], targets())
        + 0.3 * ce(uni["image"], targets())
    )
    assert torch.allclose(total_loss(model, out), expected)
    assert out.info["gb/w_fused"] == pytest.approx(0.5)


def test_gb_weight_formula_by_hand():
    before = {"audio": (2.0, 2.1), "image": (1.5, 1.6), "fused": (1.0, 1.2)}
    after = {"audio": (1.0, 1.5), "image": (0.5, 1.2), "fused": (0.4, 1.1)}
    # delta: ΔG = V0 - V1, ΔO = (V1 - T1) - (V0 - T0); w ∝ ΔG / ΔO²
    raw = {"audio": 0.6 / 0.4**2, "image": 0.4 / 0.6**2, "fused": 0.1 / 0.5**2}
    z = sum(raw.values())
    got = blend_weights_from_losses(before, after, "delta")
    assert got == pytest.approx({h: w / z for h, w in raw.items()})
    # MultiBench (delta=False): w ∝ V1 / (V1 - T1)²
    raw = {"audio": 1.5 / 0.5**2, "image": 1.2 / 0.7**2, "fused": 1.1 / 0.7**2}
    z = sum(raw.values())
    assert blend_weights_from_losses(None, after, "multibench") == pytest.approx(
        {h: w / z for h, w in raw.items()}
    )
    # a head whose held-out loss got worse gets no weight; if none improved, no estimate
    worse = {**after, "audio": (1.0, 2.5)}
    assert blend_weights_from_losses(before, worse, "delta")["audio"] == 0.0
    assert blend_weights_from_losses(before, {h: (0.1, 9.0) for h in after}, "delta") is None


@pytest.mark.parametrize("form", ["delta", "multibench"])
def test_gb_callback_reestimates_weights_of_a_profusion_wrapped_model(form):
    from functools import partial

    import pytorch_lightning as pl

    from fusionbench.data import SyntheticDataModule
    from fusionbench.fusion.gradient_blend.callback import GradientBlendCallback
    from fusionbench.task import FusionTask

    dm = SyntheticDataModule(
        shapes={"audio": 6, "image": [1, 3, 3]},
        num_outputs=3,
        num_samples={"train": 64, "val": 32, "test": 8},
        batch_size=16,
    )
    dm.prepare_data()
    dm.setup("fit")
    torch.manual_seed(0)
    encoders = nn.ModuleDict({m: MLPEncoder(d, [8]) for m, d in dm.input_dims.items()})
    model = ProFusion(
        encoders,
        3,
        base="gradient_blend",
        base_args={"head_hidden": [8], "uni_head_hidden": [8]},
        unroll_steps=2,
    )
    task = FusionTask(model, "multiclass", 3, optimizer=partial(torch.optim.SGD, lr=0.5))
    callback = GradientBlendCallback(gb_epoch=1, form=form, max_batches=2)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[callback],
    )
    trainer.fit(task, datamodule=dm)
    weights = model.base.blend_weights
    assert torch.allclose(weights.sum(), torch.tensor(1.0)) and (weights >= 0).all()
    assert not torch.allclose(weights, torch.full((3,), 1 / 3))
    assert set(callback.snapshot) == {"audio", "image", "fused"}
    if form == "multibench":  # depends on the last measurement only
        expected = blend_weights_from_losses(None, callback.snapshot, form)
        assert weights.tolist() == pytest.approx([expected[h] for h in model.base.heads])
    assert "gb/heldout_loss_fused" in trainer.callback_metrics


def test_gb_callback_leaves_other_fusions_alone_and_refuses_two_blends():
    from fusionbench.fusion.gradient_blend.callback import GradientBlendCallback

    assert (
        GradientBlendCallback.blend_model(build("refnet")) is None
    )  # in every run's callbacks: a no-op there
    with pytest.raises(ConfigError, match="drives one GradientBlendFusion; this model holds 2"):
        GradientBlendCallback.blend_model(nn.ModuleList([build("gradient_blend"), build("gradient_blend")]))
    with pytest.raises(ConfigError, match="weights must name"):
        GradientBlendFusion(lenet_encoders(), 10, init_weights={"audio": 1.0, "fused": 1.0})


# ------------------------------------------------------------------------------------------- MBT


def test_patch_encoder_tokens_and_context():
    enc = patch_encoders()["audio"]
    x = batch()["audio"]
    tokens = enc(x)
    assert tokens.shape == (B, 49, 64)
    enc.attach_context(5, 0)
    c = torch.randn(B, 5)
    shift = enc.context_join.proj(c)  # B c added to every patch embedding
    assert torch.allclose(enc(x, c), tokens + shift[:, None, :], atol=1e-5)
    with pytest.raises(ConfigError, match="image_size"):
        enc(torch.rand(B, 1, 28, 28))


def test_mbt_token_counts_and_bottleneck_is_the_only_exchange():
    model = build("mbt").eval()
    x = batch()
    with torch.no_grad():
        tokens = model.tokens(model.encode(x))
        assert {m: t.shape[1] for m, t in tokens.items()} == {"audio": 1 + 49, "image": 1 + 16}
        assert model.bottleneck.shape == (1, 4, 64) and len(model.layers["image"]) == 4
        # without fusion layers the image CLS ignores the audio; with them it depends on it
        other = dict(x, audio=torch.rand(B, 1, 112, 112))
        late = build("mbt", fusion_layer=4).eval()
        a, b = late.step(x), late.step(other)
        assert torch.equal(a.embeddings["image"], b.embeddings["image"])
        assert not torch.equal(a.embeddings["audio"], b.embeddings["audio"])
        a, b = model.step(x), model.step(other)
        assert not torch.allclose(a.embeddings["image"], b.embeddings["image"])


def test_mbt_fused_vector_is_the_mean_of_the_cls_tokens():
    model = build("mbt").eval()
    with torch.no_grad():
        step = model.step(batch())
        assert torch.allclose(step.fused, (step.embeddings["audio"] + step.embeddings["image"]) / 2)
        assert torch.allclose(model.predict(step).logits, model.head(step.fused))


def test_mbt_accepts_vector_encoders_and_checks_its_sizes():
    model = MBTFusion(nn.ModuleDict({"image": MLPEncoder(784, [8]), "audio": MLPEncoder(12544, [8])}), 10)
    assert sorted(model.input_proj) == ["audio", "image"]
    assert model(batch()).logits.shape == (B, 10)
    with pytest.raises(ConfigError, match="fusion_layer"):
        MBTFusion(patch_encoders(), 10, fusion_layer=5)
    with pytest.raises(ConfigError, match="divisible"):
        MBTFusion(patch_encoders(), 10, heads=5)
