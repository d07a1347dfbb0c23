"""CM-BERT (masked multimodal attention over BERT's hidden states) and CM-BERT + DEQ fusion: the attention by
hand, masking, the frozen head, the equilibrium, implicit gradients, the Table 7 switches, BatchNorm
statistics, Pro-Fusion around both, and one end-to-end run on the mosi_cmbert fixture."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAST
from torch import nn

from fusionbench.encoders import IdentityEncoder, PretrainedTextEncoder, SequenceIdentityEncoder
from fusionbench.encoders.pretrained import split_tokens, tiny_config
from fusionbench.errors import ConfigError
from fusionbench.fusion import CMBERTDEQFusion, CMBERTFusion, ProFusion

L, B, H = 6, 4, 32  # token positions, batch, the tiny BERT's width


@pytest.fixture(autouse=True)
def one_thread():
    """The solver loops are hundreds of tiny ops: with two threads on a shared CPU each op waits for the
    other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def encoders(output: str = "sequence", dropout: float | None = 0.0) -> nn.ModuleDict:
    text = PretrainedTextEncoder(config=tiny_config(), output=output, dropout=dropout)
    return nn.ModuleDict({"text": text, "audio": SequenceIdentityEncoder(5)})


def batch(n: int = B, length: int = L, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids + mask with real lengths L, L - 1, ... (at least 2), audio zero at the padding."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([max(2, length - i) for i in range(n)])
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = torch.randint(5, 128, (n, length), generator=g) * mask
    audio = torch.randn(n, length, 5, generator=g, dtype=torch.get_default_dtype()) * mask[..., None]
    return {"text": torch.stack([ids, mask], dim=1), "audio": audio}


def cmbert(**kw) -> CMBERTFusion:
    kw = {"attention_dropout": 0.0, "dropout": 0.0, **kw}
    return CMBERTFusion(encoders(), 1, **kw)


def cmbert_deq(**kw) -> CMBERTDEQFusion:
    kw = {"attention_dropout": 0.0, "dropout": 0.0, "seq_len": L, **kw}
    return CMBERTDEQFusion(encoders(), 1, **kw)


def contractive(model: CMBERTDEQFusion, scale: float = 0.3) -> CMBERTDEQFusion:
    """Shrink the DEQ layer's convolutions so that it is a contraction. At initialisation the code's layer is
    not one (Jacobian spectral radius about 2-3 at L = 50): its solves converge only once training has
    shrunk it; tests that compare gradients or fixed points need one that converges tightly."""
    with torch.no_grad():
        for name, p in model.fusion.deq.named_parameters():
            if name.endswith("weight") and p.dim() == 3:
                p.mul_(scale)
    return model


def tight(**kw) -> dict:
    return dict(f_max_iter=200, b_max_iter=200, f_tol=1e-10, b_tol=1e-10, f_stop_mode="rel", **kw)


def by_hand(model: CMBERTFusion, x: dict[str, torch.Tensor]) -> torch.Tensor:
    """CM-BERT's forward (thuiar/Cross-Modal-BERT BertFinetun + classifier) written out, eval mode."""
    f = model.fusion
    h = model.encoders["text"](x["text"])
    mask = split_tokens(x["text"])[1].to(h.dtype)
    t = h @ f.proj_t.weight[:, :, 0].T
    t = t / math.sqrt(float(t.reshape(-1).norm()))
    a = x["audio"] @ f.proj_a.weight[:, :, 0].T
    s = f.text_weight * torch.relu(t @ t.transpose(1, 2)) + f.audio_weight * torch.relu(a @ a.transpose(1, 2))
    s = s + f.bias
    ext = (1 - mask) * -10000.0
    w = torch.softmax(s + ext[:, None, :] + ext[:, :, None], dim=-1)
    out = nn.functional.layer_norm(
        (w @ h + h) @ f.dense.weight.T + f.dense.bias, (H,), f.norm.weight, f.norm.bias, 1e-12
    )
    return out[:, 0] @ model.head[1].weight.T + model.head[1].bias


# -- CM-BERT ---------------------------------------------------------------------------------------------
def test_forward_matches_the_code_written_out_by_hand():
    torch.manual_seed(0)
    model = cmbert().eval()
    x = batch()
    with torch.no_grad():
        out = model(x)
        assert out.logits.shape == (B, 1) and model.fused_dim == H
        assert torch.allclose(out.logits, by_hand(model, x), atol=1e-5)
        step = model.step(x)
    assert step.fused.shape == (B, H) and step.embeddings["text"].shape == (B, L, H)


def test_attention_matrices_by_hand_on_a_tiny_example():
    model = cmbert()
    with torch.no_grad():
        model.fusion.proj_t.weight.zero_()
        model.fusion.proj_t.weight[0, 0, 0] = 1.0  # T keeps the first hidden feature only
        model.fusion.proj_a.weight.zero_()
        model.fusion.proj_a.weight[0, 1, 0] = 2.0  # P = 2 x the second audio feature
    h = torch.zeros(2, 3, H)
    h[0, :, 0] = torch.tensor([1.0, -2.0, 2.0])
    h[1, :, 0] = torch.tensor([0.0, 4.0, 0.0])
    audio = torch.zeros(2, 3, 5)
    audio[0, :, 1] = torch.tensor([1.0, 0.0, -1.0])
    a_t, a_a = model.attention_logits(h, audio)
    # one norm for the whole batch: ||T|| = sqrt(1 + 4 + 4 + 16) = 5, so A_t = ReLU(T T^T) / 5
    t0 = torch.tensor([1.0, -2.0, 2.0])
    assert torch.allclose(a_t[0], torch.relu(torch.outer(t0, t0)) / 5)
    assert torch.allclose(a_t[1], torch.diag(torch.tensor([0.0, 16.0, 0.0])) / 5)
    p0 = torch.tensor([2.0, 0.0, -2.0])
    assert torch.allclose(a_a[0], torch.relu(torch.outer(p0, p0))) and a_a[1].abs().sum() == 0
    # text_scale=sample: each sample's own norm (3 and 4)
    model.fusion.text_scale = "sample"
    a_t, _ = model.attention_logits(h, audio)
    assert torch.allclose(a_t[0], torch.relu(torch.outer(t0, t0)) / 3)
    assert torch.allclose(a_t[1], torch.diag(torch.tensor([0.0, 16.0, 0.0])) / 4)
    # no gradient flows through the scale (the code takes it in numpy)
    h.requires_grad_(True)
    model.fusion.text_scale = "batch"
    a_t, _ = model.attention_logits(h, audio)
    (g,) = torch.autograd.grad(a_t[0, 0, 0], h)
    assert torch.allclose(g[0, 0, 0], torch.tensor(2.0 / 5))  # d(t_0^2 / 5) / dt_0 with the norm held fixed


def test_padded_positions_get_no_attention():
    model = cmbert()
    scores = torch.randn(2, 4, 4) * 3
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    w = model.fusion.weights(scores, mask)
    assert torch.allclose(w.sum(-1), torch.ones(2, 4))
    assert w[1, :2, 2:].max() < 1e-30  # real queries never look at padding
    assert torch.allclose(w[1, :2, :2], torch.softmax(scores[1, :2, :2], -1))
    # a padded query row is shifted as a whole: it still attends to the real keys, as in the code
    # (within float32's resolution at -10000)
    assert torch.allclose(w[1, 3, :2], torch.softmax(scores[1, 3, :2], -1), atol=1e-3)
    # so what sits at a padded position never reaches [CLS]
    h = torch.randn(2, 4, H)
    h2 = h.clone()
    h2[1, 2:] += 100.0
    model.eval()
    out, out2 = model.fusion.attend(scores, h, mask), model.fusion.attend(scores, h2, mask)
    assert torch.allclose(out[:, 0], out2[:, 0], atol=1e-5)


def test_weights_start_at_one_one_zero_and_are_logged():
    model = cmbert()
    f = model.fusion
    assert (f.text_weight.item(), f.audio_weight.item(), f.bias.item()) == (1.0, 1.0, 0.0)
    with torch.no_grad():
        f.text_weight.fill_(0.5)
    info = model(batch()).info
    assert (float(info["cmbert/w_t"]), float(info["cmbert/w_a"]), float(info["cmbert/b"])) == (0.5, 1.0, 0.0)


def test_freeze_head_freezes_exactly_the_head():
    frozen = {n for n, p in cmbert().named_parameters() if not p.requires_grad}
    assert frozen == {"head.1.weight", "head.1.bias"}
    assert all(p.requires_grad for p in cmbert(freeze_head=False).parameters())
    head = cmbert().head[1]
    assert (
        head.bias.abs().sum() == 0 and 0.005 < float(head.weight.std()) < 0.04
    )  # normal(0, 0.02), zero bias
    # the head gets no gradient, everything before it does
    model = cmbert().train()
    model(batch()).logits.sum().backward()
    assert model.head[1].weight.grad is None and model.fusion.dense.weight.grad.abs().sum() > 0


def test_the_fusion_parameters_share_one_prefix_for_an_optimizer_group():
    names = [n for n, _ in cmbert_deq().named_parameters() if not n.startswith("encoders.")]
    assert all(n.startswith(("fusion.", "head.")) for n in names)
    assert {"fusion.text_weight", "fusion.audio_weight", "fusion.bias", "fusion.deq.gate.weight"} <= set(
        names
    )


def test_wrong_inputs_say_what_to_do():
    extra = encoders()
    extra["vision"] = SequenceIdentityEncoder(3)
    with pytest.raises(ConfigError, match=r"exactly the modalities \['audio', 'text'\]"):
        CMBERTFusion(extra, 1)
    with pytest.raises(ConfigError, match=r"exactly the modalities"):
        CMBERTDEQFusion(extra, 1)
    with pytest.raises(ConfigError, match=r"IdentityEncoder.*backbone.text.output=sequence"):
        CMBERTFusion(nn.ModuleDict({"audio": SequenceIdentityEncoder(5), "text": IdentityEncoder(4)}), 1)
    with pytest.raises(ConfigError, match=r"backbone.text.output=sequence"):
        CMBERTFusion(encoders(output="pooled"), 1)
    with pytest.raises(ConfigError, match="text_scale"):
        cmbert(text_scale="global")
    model = cmbert()
    with pytest.raises(ConfigError, match="word-aligned"):
        model.attention_logits(torch.zeros(2, L, H), torch.zeros(2, L + 1, 5))
    with pytest.raises(ConfigError, match=r"fusion.seq_len=6.*dataset.max_seq_len"):
        cmbert_deq()(batch(length=L + 2))
    with pytest.raises(ConfigError, match="bn_stats"):
        cmbert_deq(bn_stats="never")


# -- CM-BERT + DEQ ---------------------------------------------------------------------------------------
def injection(model: CMBERTDEQFusion, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    emb = model.encode(x)
    return model.injection(*model.attention_logits(emb["text"], emb["audio"]))


@pytest.mark.parametrize("train", [False, True])
def test_the_solver_reaches_a_fixed_point_of_the_untrained_layer(train):
    torch.manual_seed(0)
    model = contractive(cmbert_deq(**tight())).train(train)
    x = batch()
    with torch.no_grad():
        xs, xf = injection(model, x)
        state, _, info = model.equilibrium(xs, xf)
        assert float(info["deq/rel_residual"]) < 1e-6 and float(info["deq/f_failed"]) == 0
        assert 2 < float(info["deq/nstep"]) <= 200
        assert torch.allclose(model.layer(state, xs, xf), state, atol=1e-5)
        # and it is what plain iteration from zero reaches
        z = torch.zeros_like(state)
        for _ in range(200):
            z = model.layer(z, xs, xf)
        assert torch.allclose(z, state, atol=1e-5)
    assert model.forward_stats["train" if train else "eval"].summary()["converged"] == 1.0


def test_the_equilibrium_replaces_the_weighted_sum():
    torch.manual_seed(0)
    model = contractive(cmbert_deq(**tight())).eval()
    x = batch()
    with torch.no_grad():
        xs, xf = injection(model, x)
        z_fuse = model.equilibrium(xs, xf)[0][:, -1]
        h = model.encoders["text"](x["text"])
        expected = model.head(model.fusion.attend(z_fuse, h, split_tokens(x["text"])[1])[:, 0])
        assert torch.allclose(model(x).logits, expected, atol=1e-6)
        assert not torch.allclose(z_fuse, xf, atol=1e-3)


def test_gradients_reach_bert_and_every_part_of_the_deq_layer():
    torch.manual_seed(0)
    model = cmbert_deq(f_max_iter=30, b_max_iter=30).train()
    out = model(batch())
    (out.logits.square().sum() + out.aux_loss).backward()
    for name in (
        "encoders.text.model.encoder.layer.0.attention.self.query.weight",
        "fusion.proj_t.weight",
        "fusion.proj_a.weight",
        "fusion.text_weight",
        "fusion.deq.blocks.text.conv1.weight",
        "fusion.deq.blocks.audio.norm.weight",
        "fusion.deq.gate.weight",
        "fusion.deq.fuse.weight",
        "fusion.deq.norm.weight",
        "fusion.dense.weight",
    ):
        g = model.get_parameter(name).grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
    assert model.backward_stats.summary()["solves"] == B  # every sample's adjoint solve was checked


def test_implicit_gradient_matches_a_long_unrolled_solve(float64):
    torch.manual_seed(0)
    model = contractive(cmbert_deq(**tight())).train()
    with torch.no_grad():
        xs0, xf0 = injection(model, batch())
    weight = torch.randn(B, L, L)
    params = [
        model.fusion.deq.blocks.text.conv1.weight,
        model.fusion.deq.gate.weight,
        model.fusion.deq.norm.bias,
    ]

    def grads(unrolled: bool) -> list[torch.Tensor]:
        xs, xf = xs0.clone().requires_grad_(True), xf0.clone().requires_grad_(True)
        if unrolled:
            state = xs.new_zeros(B, 3, L, L)
            for _ in range(300):
                state = model.layer(state, xs, xf)
        else:
            state = model.equilibrium(xs, xf)[0]
        return list(torch.autograd.grad((state[:, -1] * weight).sum(), [xs, xf, *params]))

    g_ift, g_unr = grads(False), grads(True)
    assert model.backward_stats.summary()["fallback"] == 0.0  # the adjoint solve passed its check
    for a, b in zip(g_ift, g_unr):
        assert torch.isfinite(a).all()
        cosine = float((a * b).sum() / (a.norm() * b.norm()))
        assert cosine > 0.99 and float((a - b).norm() / b.norm()) < 1e-4


def test_recursion_off_is_one_application_from_zero():
    torch.manual_seed(0)
    model = cmbert_deq(recursion=False).train()
    xs, xf = injection(model, batch())
    state, aux, info = model.equilibrium(xs, xf)
    assert aux is None and info == {}
    assert torch.equal(state, model.layer(torch.zeros_like(state), xs, xf))


def test_f_theta_off_keeps_the_matrices_and_still_solves():
    torch.manual_seed(0)
    model = contractive(cmbert_deq(use_f_theta=False, **tight())).eval()
    assert not hasattr(model.fusion.deq, "blocks")
    with torch.no_grad():
        xs, xf = injection(model, batch())
        state, _, info = model.equilibrium(xs, xf)
    assert torch.equal(state[:, :2], xs) and "deq/nstep" in info  # z_i = x_i; the gate still reads z_fuse


def test_f_fuse_off_is_the_weighted_sum_of_the_modality_states():
    torch.manual_seed(0)
    model = contractive(cmbert_deq(use_f_fuse=False, **tight())).eval()
    assert not hasattr(model.fusion.deq, "fuse") and not hasattr(model.fusion.deq, "gate")
    with torch.no_grad():
        model.fusion.text_weight.fill_(0.7)
        model.fusion.bias.fill_(0.2)
        xs, xf = injection(model, batch())
        state = model.equilibrium(xs, xf)[0]
    assert torch.allclose(state[:, 2], 0.7 * state[:, 1] + 1.0 * state[:, 0] + 0.2, atol=1e-6)


def test_gate_off_uses_the_modality_states_themselves():
    torch.manual_seed(0)
    model = cmbert_deq(use_gate=False).eval()
    deq = model.fusion.deq
    assert deq.gate is None
    with torch.no_grad():
        xs, xf = injection(model, batch())
        state = torch.randn(B, 3, L, L)
        other = state.clone()
        other[:, 2] = torch.randn(B, L, L)  # another z_fuse: without the gate f_fuse does not read it
        a, b = model.layer(state, xs, xf), model.layer(other, xs, xf)
        assert torch.equal(a, b)
        z = deq.f_theta(state[:, :2], xs)
        assert torch.allclose(a[:, 2], deq.norm(torch.relu(deq.fuse(z.sum(1)) + xf)))


def test_everything_off_is_cmbert():
    torch.manual_seed(0)
    off = dict(use_f_theta=False, use_f_fuse=False, recursion=False, use_gate=False)
    model = cmbert_deq(**off).eval()
    assert not list(model.fusion.deq.parameters())
    base = cmbert().eval()
    base.load_state_dict(model.state_dict())
    with torch.no_grad():
        model.fusion.text_weight.fill_(0.3)
        base.fusion.text_weight.fill_(0.3)
        x = batch()
        assert torch.allclose(model(x).logits, base(x).logits, atol=1e-6)
        assert torch.allclose(model(x).logits, by_hand(base, x), atol=1e-5)


def test_jacobian_penalty_only_in_training():
    torch.manual_seed(0)
    model = cmbert_deq(f_max_iter=20, b_max_iter=20).train()
    out = model(batch())
    assert out.aux_loss is not None and float(out.aux_loss) > 0
    assert torch.allclose(out.aux_loss, 0.02 * out.info["deq/jac_loss"])
    assert out.aux_loss.requires_grad  # it trains the layer
    model.eval()
    assert model(batch()).aux_loss is None
    assert cmbert_deq(jac_weight=0.0, f_max_iter=20).train()(batch()).aux_loss is None


def test_solver_statistics_are_logged():
    torch.manual_seed(0)
    info = cmbert_deq(f_max_iter=20).eval()(batch()).info
    assert {"deq/nstep", "deq/rel_residual", "deq/abs_residual", "deq/converged", "deq/f_failed"} <= set(info)
    assert {"cmbert/w_t", "cmbert/w_a", "cmbert/b"} <= set(info)


def test_batch_norm_running_statistics_follow_bn_stats():
    torch.manual_seed(0)
    x = batch()
    every = contractive(cmbert_deq(**tight())).train()
    once = contractive(cmbert_deq(bn_stats="once", **tight())).train()
    once.load_state_dict(every.state_dict())
    out = every(x)
    solver_calls = int(out.info["deq/nstep"])
    bn = every.fusion.deq.blocks["text"].norm
    assert int(bn.num_batches_tracked) >= solver_calls  # every application updated them
    once(x)
    bn = once.fusion.deq.blocks["text"].norm
    assert int(bn.num_batches_tracked) == 1  # one update per training solve ...
    with torch.no_grad():  # ... a momentum step towards BN's input statistics at the equilibrium
        xs, xf = injection(once, x)
        z = once.equilibrium(xs, xf)[0]  # the same solve; without grad nothing is updated
        pre = once.fusion.deq.blocks["text"].pre_norm(z[:, 1], xs[:, 1])  # (B, L, L): channels on axis 1
    assert int(bn.num_batches_tracked) == 1
    assert torch.allclose(bn.running_mean, 0.1 * pre.mean(dim=(0, 2)), atol=1e-6)
    assert torch.allclose(bn.running_var, 0.9 + 0.1 * pre.var(dim=(0, 2)), atol=1e-6)
    assert not torch.allclose(every.fusion.deq.blocks["text"].norm.running_mean, bn.running_mean, atol=1e-4)


def test_trace_reports_convergence_and_gate_shares():
    torch.manual_seed(0)
    model = contractive(cmbert_deq()).eval()
    trace = model.trace(model.encode(batch()), steps=5)
    assert len(trace["iteration_rel_diff"]) == 5 and len(trace["solver_rel_residual"]) == 5
    shares = trace["gate_share"]
    assert sorted(shares) == ["audio", "text"]
    assert all(abs(a + t - 1) < 1e-6 for a, t in zip(shares["audio"], shares["text"]))


# -- Pro-Fusion around CM-BERT ---------------------------------------------------------------------------
@pytest.mark.parametrize("base", ["cmbert", "cmbert_deq"])
def test_profusion_with_zero_backprojection_is_the_base_model(base):
    torch.manual_seed(0)
    args = {"seq_len": L, "f_max_iter": 20} if base == "cmbert_deq" else {}
    model = ProFusion(encoders(), 1, base=base, base_args=args, unroll_steps=2, context_dim=8).eval()
    assert model.base.encoders["text"].context_join.layer == 0
    for w in model.backproject.values():
        nn.init.zeros_(w.weight)
    x = batch()
    with torch.no_grad():
        assert torch.equal(model(x).logits, model.base(x).logits)
        for w in model.backproject.values():
            nn.init.normal_(w.weight)
        assert not torch.allclose(model(x).logits, model.base(x).logits)


# -- end to end ------------------------------------------------------------------------------------------
def test_cmbert_deq_trains_on_the_mosi_cmbert_fixture(make_cfg, tmp_path):
    from fusionbench.data.mosi_cmbert import write_fixture
    from fusionbench.data.text import FIXTURE_WORDS
    from fusionbench.encoders.pretrained import save_tiny_pretrained
    from fusionbench.train import train

    write_fixture(tmp_path / "mosi_cmbert")
    tiny = save_tiny_pretrained(tmp_path / "tiny", words=FIXTURE_WORDS)
    cfg = make_cfg(
        [
            "dataset=mosi_cmbert",
            "fusion=cmbert_deq",
            f"paths.data_dir={tmp_path}",
            f"backbone.text.pretrained={tiny}",
            "dataset.num_samples={train: 24, val: 8, test: 8}",
            "dataset.verify_checksums=false",
            "fusion.f_max_iter=30",
            "fusion.b_max_iter=30",
            "optimizer=adamw",
            "optimizer.lr=2e-5",
            "optimizer_groups=[{match: 'bias|LayerNorm[.]weight', weight_decay: 0.0},"
            " {match: '(^|[.])fusion[.]', lr: 0.01}]",
            "scheduler={_target_: fusionbench.schedules.linear_warmup, _partial_: true, warmup: 0.1}",
            "scheduler_interval=step",
            *FAST,
            "trainer.max_epochs=1",
        ]
    )
    assert cfg.backbone.text.output == "sequence" and cfg.backbone.text.freeze_embeddings
    record, objs = train(cfg)
    model = objs["task"].model
    assert isinstance(model, CMBERTDEQFusion) and model.seq_len == 50
    assert not any(p.requires_grad for p in model.encoders["text"].model.embeddings.parameters())
    for key in ("test/mae", "test/acc2_all_gt0", "test/acc7", "test/deq/rel_residual", "test/deq/nstep"):
        assert math.isfinite(record["metrics"][key]), key
    # the recipe's groups: biases without decay (the code's substring rule), the fusion module at 0.01
    default, no_decay, fusion = objs["task"].param_groups()
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    assert id(model.fusion.bias) in ids(no_decay) and id(model.fusion.deq.gate.bias) in ids(no_decay)
    assert id(model.fusion.deq.gate.weight) in ids(fusion) and fusion["lr"] == 0.01
    assert id(model.encoders["text"].model.encoder.layer[0].output.dense.weight) in ids(default)
    assert id(model.head[1].weight) not in ids(default) | ids(no_decay) | ids(fusion)  # frozen
