"""MMIM (issue 15, Pro-Fusion's "MIM" rows): shapes, the likelihood, CPC and entropy terms by hand, the
separation of the estimators' gradients from the rest of the model, the RNN encoder on packed steps,
Pro-Fusion around it, and one epoch on the MAG pickle fixture. Tiny random BERT: no weights, no network."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAST
from torch import nn

from fusionbench.encoders.pretrained import PretrainedTextEncoder, save_tiny_pretrained, tiny_config
from fusionbench.errors import ConfigError
from fusionbench.fusion import MMIMFusion, ProFusion
from fusionbench.fusion.mmim import CPC, MMILB, RNNEncoder

B, L, DA, DV = 12, 9, 5, 3


def encoders() -> nn.ModuleDict:
    return nn.ModuleDict(
        {
            "text": PretrainedTextEncoder(config=tiny_config()),
            "audio": RNNEncoder(DA),
            "vision": RNNEncoder(DV),
        }
    )


def model(**kw) -> MMIMFusion:
    torch.manual_seed(0)
    return MMIMFusion(encoders(), 1, **kw)


def batch(seed: int = 1, n: int = B) -> dict[str, torch.Tensor]:
    """Right-padded tokens (B, 2, L), [CLS] .. [SEP]; word-aligned audio / vision, zero outside the words."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, L + 1, (n,), generator=g)
    mask = (torch.arange(L) < lengths.unsqueeze(1)).long()
    ids = torch.randint(5, 100, (n, L), generator=g) * mask
    words = mask.clone()
    words[:, 0] = 0
    words[torch.arange(n), lengths - 1] = 0  # [CLS] and [SEP] rows are zeros
    audio = torch.randn(n, L, DA, generator=g) * words.unsqueeze(-1)
    vision = torch.randn(n, L, DV, generator=g) * words.unsqueeze(-1)
    return {"text": torch.stack([ids, mask], 1), "audio": audio, "vision": vision}


def labels(n: int = B) -> torch.Tensor:
    return torch.tensor([(-1.0) ** i * (1 + i % 3) for i in range(n)]).reshape(n, 1)  # half positive


def test_shapes_info_and_aux_loss_only_in_training() -> None:
    m = model()
    out = m(batch())
    assert out.logits.shape == (B, 1) and m.fused_dim == 128
    assert not any(p.requires_grad for p in m.encoders["text"].model.pooler.parameters())  # unused: [CLS]
    assert out.aux_loss is not None and out.aux_loss.dim() == 0 and out.aux_loss.requires_grad
    assert set(out.info) == {"mmim/lld", "mmim/nce"} and all(v.dim() == 0 for v in out.info.values())
    assert set(out.extras) == {"tv", "ta"} and out.extras["tv"].shape == (B, 4)  # tanh(P y): 16 -> 4
    m.eval()
    with torch.no_grad():
        out = m(batch())
    assert out.aux_loss is None and out.extras is None
    assert m.target_loss(out, labels()).item() == 0.0


def test_mmilb_lld_is_the_gaussian_log_likelihood_by_hand() -> None:
    est = MMILB(2, 2, form="code")
    with torch.no_grad():  # mu(x) = relu(x) + 1, logvar(x) = relu(x) (first Linear: identity)
        for net, bias in ((est.mu, 1.0), (est.logvar, 0.0)):
            net[0].weight.copy_(torch.eye(2)), net[0].bias.zero_()
            net[2].weight.copy_(torch.eye(2)), net[2].bias.fill_(bias)
    x = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    y = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    # sample 1: mu = (2, 1), var = (e, 1);  sample 2: mu = (1.5, 4), var = (e^0.5, e^3)
    mu = [[2.0, 1.0], [1.5, 4.0]]
    logvar = [[1.0, 0.0], [0.5, 3.0]]
    sq = [
        [(y[i, d].item() - mu[i][d]) ** 2 / (2 * math.exp(logvar[i][d])) for d in range(2)] for i in range(2)
    ]
    code = -(sum(sq[0]) + sum(sq[1])) / 2
    assert est(x, y).item() == pytest.approx(code, rel=1e-6)
    est.form = "gaussian"
    full = code - (sum(logvar[0]) + sum(logvar[1])) / 4 - math.log(2 * math.pi)  # 2 dims x 1/2 log 2 pi
    assert est(x, y).item() == pytest.approx(full, rel=1e-6)


def test_cpc_nce_is_a_softmax_over_the_batch_by_hand() -> None:
    torch.manual_seed(0)
    cpc = CPC(3, 4)
    x, z = torch.randn(5, 3), torch.randn(5, 4)
    pred = cpc.net(z).detach()
    unit = [v / v.norm() for v in x]
    punit = [p / p.norm() for p in pred]
    loss = 0.0
    for i in range(5):
        scores = [math.exp(float(unit[i] @ punit[j])) for j in range(5)]
        loss += -math.log(scores[i] / sum(scores))
    assert cpc(x, z).item() == pytest.approx(loss / 5, rel=1e-5)


def trainable(m: MMIMFusion) -> tuple[list, list]:
    est = [(n, p) for n, p in m.named_parameters() if p.requires_grad and n.startswith("mmilb.")]
    rest = [(n, p) for n, p in m.named_parameters() if p.requires_grad and not n.startswith("mmilb.")]
    return est, rest


def test_estimators_get_only_their_own_gradient_and_nothing_else_gets_it() -> None:
    m = model(dropout=0.0)
    m.encoders.eval()  # no BERT dropout: the hand computation sees the same embeddings
    est, rest = trainable(m)
    emb = m.encode(batch())
    fused, aux, _ = m.combine(emb)
    t, a, v = emb["text"], emb["audio"], emb["vision"]
    own = -(m.mmilb["tv"](t.detach(), v.detach()) + m.mmilb["ta"](t.detach(), a.detach()))
    main = 0.1 * sum(m.cpc[k](emb[k], fused) for k in ("text", "audio", "vision")) - 0.1 * (
        m.mmilb["tv"](t, v) + m.mmilb["ta"](t, a)
    )
    g_aux = torch.autograd.grad(aux, [p for _, p in est + rest], retain_graph=True, allow_unused=True)
    g_own = torch.autograd.grad(own, [p for _, p in est], retain_graph=True)
    g_main = torch.autograd.grad(main, [p for _, p in rest], allow_unused=True)
    for (name, _), got, want in zip(est + rest, g_aux, [*g_own, *g_main], strict=True):
        got = torch.zeros(1) if got is None else got
        want = torch.zeros(1) if want is None else want
        assert torch.allclose(got, want, atol=1e-6), name
    assert all(g.abs().sum() > 0 for g in g_own)  # the estimators do learn
    assert (
        g_aux[len(est) + [n for n, _ in rest].index("encoders.text.model.embeddings.word_embeddings.weight")]
        .abs()
        .sum()
        > 0
    )


def test_with_alpha_beta_zero_only_the_estimators_get_gradients() -> None:
    m = model(alpha=0.0, beta=0.0, dropout=0.0)
    est, rest = trainable(m)
    aux = m(batch()).aux_loss
    grads = torch.autograd.grad(aux, [p for _, p in est + rest], allow_unused=True)
    for (name, _), g in zip(est + rest, grads, strict=True):
        if name.startswith("mmilb."):
            assert g is not None and g.abs().sum() > 0, name
        else:  # encoders, CPC, SubNet, head: nothing from the estimators' objective
            assert g is None or g.abs().sum() == 0, name


def test_one_training_step_moves_estimators_and_encoders_but_never_the_entropy_projection() -> None:
    m = model()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4)
    y = labels()
    for seed in (1, 2, 3):  # the third batch adds the entropy term
        out = m(batch(seed))
        loss = (out.logits - y).abs().mean() + out.aux_loss + m.target_loss(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, p in m.named_parameters():
        moved = not torch.equal(p, before[name])
        unused = "entropy_prj" in name or ".pooler." in name  # fixed; BERT's pooler (MMIM reads [CLS])
        assert moved != unused, name


def test_rnn_encoder_reads_only_the_real_steps_and_context_is_a_concatenated_input() -> None:
    torch.manual_seed(0)
    for bidirectional in (False, True):
        enc = RNNEncoder(3, hidden=4, out_size=5, bidirectional=bidirectional).eval()
        x, lengths = torch.randn(4, 6, 3), torch.tensor([6, 2, 4, 1])
        out = enc(x, lengths=lengths)
        for i, n in enumerate(lengths.tolist()):
            assert torch.allclose(out[i], enc(x[i : i + 1, :n])[0], atol=1e-6)
        enc.attach_context(2, 0)
        nn.init.normal_(enc.context_join.proj.weight)
        c = torch.randn(4, 2)
        wide = nn.LSTM(5, 4, batch_first=True, bidirectional=bidirectional)
        state = dict(enc.rnn.state_dict())
        extra = enc.context_join.proj.weight.chunk(2 if bidirectional else 1, dim=0)
        state["weight_ih_l0"] = torch.cat([state["weight_ih_l0"], extra[0]], 1)
        if bidirectional:
            state["weight_ih_l0_reverse"] = torch.cat([state["weight_ih_l0_reverse"], extra[1]], 1)
        wide.load_state_dict(state)
        got = enc(x, c, lengths)
        for i, n in enumerate(lengths.tolist()):
            xc = torch.cat([x[i, :n], c[i].expand(n, 2)], 1).unsqueeze(0)
            h = wide(xc)[1][0]
            last = torch.cat([h[0], h[1]], -1) if bidirectional else h[-1]
            assert torch.allclose(got[i], enc.linear(last)[0], atol=1e-5)


def test_rnns_skip_cls_and_sep_rows_with_lengths_from_the_text_mask() -> None:
    m = model().eval()
    x = batch()
    n = x["text"][:, 1].sum(1)
    with torch.no_grad():
        emb = m.encode(x)
        for i, k in enumerate(n.tolist()):
            for mod in ("audio", "vision"):
                assert torch.allclose(
                    emb[mod][i], m.encoders[mod](x[mod][i : i + 1, 1 : k - 1])[0], atol=1e-6
                )


def test_entropy_term_by_hand_from_the_third_batch_and_reset_by_evaluation() -> None:
    m = model()
    y = labels()
    outs, losses = [], []
    for seed in (1, 2, 3):
        outs.append(m(batch(seed)))
        losses.append(m.target_loss(outs[-1], y))
    assert losses[0].item() == 0.0 and losses[1].item() == 0.0  # MMIM adds H once i_batch > mem_size (1)
    pos, neg = y.reshape(-1) > 0, y.reshape(-1) < 0
    h = 0.0
    for pair in ("tv", "ta"):
        prev, cur = outs[1].extras[pair].detach(), outs[2].extras[pair].detach()
        for sel in (pos, neg):
            both = torch.cat([prev[sel], cur[sel]])
            h += 0.25 * torch.logdet(torch.cov(both.t(), correction=0)).item()
    assert losses[2].item() == pytest.approx(-0.1 * h, rel=1e-4)
    assert losses[2].requires_grad  # H reaches the audio / vision encoders
    m.eval()
    m.train()  # a new epoch: fresh memory, as MMIM's per-epoch train()
    assert m.target_loss(m(batch(4)), y).item() == 0.0


def test_mmim_needs_audio_text_vision_pooled_and_right_padding() -> None:
    enc = encoders()
    del enc["vision"]
    with pytest.raises(ConfigError, match="exactly audio, text and vision"):
        MMIMFusion(enc, 1)
    enc = encoders()
    enc["text"] = PretrainedTextEncoder(config=tiny_config(), output="sequence")
    with pytest.raises(ConfigError, match="output=pooled"):
        MMIMFusion(enc, 1)
    x = batch()
    x["text"] = x["text"].flip(-1)  # left padding
    with pytest.raises(ConfigError, match="right-padded"):
        model()(x)
    with pytest.raises(ConfigError, match="fusion.lld"):
        model(lld="laplace")


def test_profusion_with_zero_backprojection_is_the_mmim_model() -> None:
    torch.manual_seed(0)
    pro = ProFusion(encoders(), 1, base="mmim", unroll_steps=2, context_dim=4)
    assert isinstance(pro.base, MMIMFusion)
    x = batch()
    out = pro(x)
    assert out.aux_loss is not None and set(out.extras) == {"tv", "ta"}
    assert pro.target_loss(out, labels()).dim() == 0
    pro.eval()
    with torch.no_grad():
        for w in pro.backproject.values():
            nn.init.normal_(w.weight)
        assert not torch.allclose(pro(x).logits, pro.base(x).logits)
        for w in pro.backproject.values():
            nn.init.zeros_(w.weight)
        assert torch.allclose(pro(x).logits, pro.base(x).logits, atol=1e-6)


def test_mmim_trains_on_the_mag_pickle_fixture(make_cfg, tmp_path) -> None:
    pytest.importorskip(
        "fusionbench.data.mag", reason="the MAG dataset (fusionbench/data/mag.py) is not there"
    )
    from fusionbench.data.mag import write_fixture
    from fusionbench.data.text import FIXTURE_WORDS
    from fusionbench.train import train

    tiny = save_tiny_pretrained(tmp_path / "tiny", words=FIXTURE_WORDS)
    write_fixture(tmp_path / "mosi_mag")
    cfg = make_cfg(
        [
            "dataset=mosi_mag",
            "backbone=mosi_mmim",
            "fusion=mmim",
            f"paths.data_dir={tmp_path}",
            f"backbone.text.pretrained={tiny}",
            "dataset.num_samples={train: 24, val: 8, test: 8}",
            "dataset.batch_size=8",
            "dataset.regression_loss=l1",
            r"optimizer_groups=[{match: 'encoders\.text\.model\.', lr: 5e-5},"
            r" {match: '\.mmilb\.', lr: 1e-3}]",
            "trainer.gradient_clip_val=1.0",
            *FAST,
            "trainer.max_epochs=1",
        ]
    )
    assert cfg.backbone.vision.in_features == 47 and cfg.fusion.alpha == cfg.fusion.beta == 0.1
    record, objs = train(cfg)
    task = objs["task"]
    assert isinstance(task.model, MMIMFusion) and task.model.encoders["audio"].in_features == 74
    groups = task.configure_optimizers().param_groups
    assert [g["lr"] for g in groups] == [1e-3, 5e-5, 1e-3]  # main, BERT, estimators
    assert objs["trainer"].current_epoch == 1
    for key in ("test/loss", "test/mae", "test/acc2_non0", "test/mmim/lld", "test/mmim/nce"):
        assert math.isfinite(record["metrics"][key]), key
    assert record["metrics"]["test/model_loss"] == 0.0  # the entropy term is training-only
