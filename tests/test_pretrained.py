"""Pretrained text encoders from local folders, the from-scratch token encoder, per-group learning rates
and the warmup schedule (issue 15, item 2). Tiny random models only: no weights, no network."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from fusionbench.encoders import PretrainedTextEncoder, SequenceIdentityEncoder, TokenEncoder
from fusionbench.encoders.pretrained import save_tiny_pretrained, split_tokens, tiny_config
from fusionbench.errors import ConfigError, TrainingError
from fusionbench.fusion import ConcatFusion
from fusionbench.schedules import linear_warmup
from fusionbench.task import FusionTask
from fusionbench.train import build_encoders

WORDS = ("the", "movie", "was", "good", "bad", "not")


def tokens(ids: list[list[int]], length: int) -> torch.Tensor:
    """The token modality (B, 2, L) from id lists, padded with 0."""
    x = torch.zeros(len(ids), 2, length, dtype=torch.long)
    for i, row in enumerate(ids):
        x[i, 0, : len(row)] = torch.tensor(row)
        x[i, 1, : len(row)] = 1
    return x


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    return save_tiny_pretrained(tmp_path_factory.mktemp("tiny") / "bert", words=WORDS)


def test_saved_folder_loads_the_saved_weights_and_tokenizer(tiny_dir) -> None:
    from transformers import AutoModel, AutoTokenizer

    enc = PretrainedTextEncoder(pretrained=str(tiny_dir))
    saved = AutoModel.from_pretrained(str(tiny_dir), local_files_only=True)
    for (name, p), q in zip(enc.model.state_dict().items(), saved.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    tok = AutoTokenizer.from_pretrained(str(tiny_dir), local_files_only=True)
    ids = tok("The movie was GOOD")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["[CLS]", "the", "movie", "was", "good", "[SEP]"]
    assert enc.output_dim == enc.hidden == 32 and enc.num_layers == 2 and enc.model_type == "bert"


def test_missing_folder_says_what_to_put_where(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"does not exist.*save_pretrained.*backbone.text.pretrained=DIR"):
        PretrainedTextEncoder(pretrained=str(tmp_path / "bert-base-uncased"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        PretrainedTextEncoder(pretrained=str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="needs `pretrained`"):
        PretrainedTextEncoder()
    with pytest.raises(ConfigError, match="model_type"):
        PretrainedTextEncoder(config={"hidden_size": 32})


def test_pooling_and_sequence_outputs() -> None:
    torch.manual_seed(0)
    enc = PretrainedTextEncoder(config=tiny_config(), pool="mean").eval()
    x = tokens([[2, 7, 8, 3], [2, 9, 3]], 6)
    h = enc.hidden_states(x)
    assert h.shape == (2, 6, 32)
    # mean over the attention mask only, by hand
    assert torch.allclose(enc(x)[1], h[1, :3].mean(0), atol=1e-6)
    enc.pool = "cls"
    assert torch.allclose(enc(x), h[:, 0])
    enc.output = "sequence"
    assert torch.equal(enc(x), h)
    xl = PretrainedTextEncoder(config=tiny_config("xlnet", 64)).eval()
    assert torch.allclose(xl(x), xl.hidden_states(x)[:, -1])  # XLNet's <cls> is the last position


def test_split_tokens_rejects_other_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(batch, 2, length\)"):
        split_tokens(torch.zeros(2, 5, dtype=torch.long))


@pytest.mark.parametrize("model_type, block", [("bert", 0), ("bert", 2), ("xlnet", 1)])
def test_edits_apply_after_their_block(model_type: str, block: int) -> None:
    """An edit after block k changes the output; zeroing after the last block zeroes it (the hook's output is
    what the model returns), and a no-op edit changes nothing."""
    torch.manual_seed(0)
    enc = PretrainedTextEncoder(config=tiny_config(model_type, 64)).eval()
    x = tokens([[2, 7, 8, 3], [2, 9, 3]], 5)
    h = enc.hidden_states(x)
    assert torch.allclose(enc.hidden_states(x, edits={block: lambda t: t}), h)
    seen = []
    changed = enc.hidden_states(x, edits={block: lambda t: seen.append(t.shape) or t + 1.0})
    assert seen == [(2, 5, 32)]  # (B, L, H) for both architectures (XLNet runs time-major inside)
    assert not torch.allclose(changed, h)
    if block == enc.num_layers:
        assert torch.equal(enc.hidden_states(x, edits={block: torch.zeros_like}), torch.zeros_like(h))
    with pytest.raises(ConfigError, match="blocks 0..2"):
        enc.hidden_states(x, edits={3: lambda t: t})


def test_context_joins_at_its_layer_and_zero_context_is_the_base() -> None:
    torch.manual_seed(0)
    enc = PretrainedTextEncoder(config=tiny_config()).eval()
    x = tokens([[2, 7, 8, 3], [2, 9, 3]], 5)
    base = enc(x)
    enc.attach_context(4, layer=1)
    assert torch.allclose(enc(x, torch.zeros(2, 4)), base)
    c = torch.randn(2, 4)
    add = enc.context_join.proj(c).unsqueeze(1)
    by_hand = enc.hidden_states(x, edits={1: lambda t: t + add})
    assert torch.allclose(enc(x, c), by_hand[:, 0], atol=1e-6)
    assert enc.join_widths() == [32, 32, 32]


def test_freezing() -> None:
    enc = PretrainedTextEncoder(config=tiny_config(), freeze_embeddings=True, freeze_layers=1)
    frozen = {n for n, p in enc.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("model.embeddings.", "model.encoder.layer.0.")) for n in frozen)
    assert any(n.startswith("model.encoder.layer.1.") for n, p in enc.named_parameters() if p.requires_grad)
    assert not any(
        p.requires_grad for p in PretrainedTextEncoder(config=tiny_config(), freeze_all=True).parameters()
    )
    with pytest.raises(ConfigError, match="has 2 layers"):
        PretrainedTextEncoder(config=tiny_config(), freeze_layers=3)


def test_dropout_override() -> None:
    enc = PretrainedTextEncoder(config=tiny_config(), dropout=0.0)
    assert all(m.p == 0.0 for m in enc.modules() if isinstance(m, nn.Dropout))


def test_token_encoder_ignores_padding() -> None:
    torch.manual_seed(0)
    for kind in ("lstm", "mean"):
        enc = TokenEncoder(vocab_size=20, embed_dim=6, kind=kind, hidden=5, bidirectional=True).eval()
        short, long = tokens([[3, 4, 5]], 3), tokens([[3, 4, 5]], 9)
        assert torch.allclose(enc(short), enc(long), atol=1e-6), kind
    enc = TokenEncoder(vocab_size=20, embed_dim=6, kind="mean").eval()
    assert torch.allclose(enc(short)[0], enc.embed.weight[[3, 4, 5]].mean(0))
    lstm = TokenEncoder(vocab_size=20, embed_dim=6, hidden=5).eval()
    _, (h, _) = lstm.lstm(lstm.embed(torch.tensor([[3, 4, 5]])))
    assert torch.allclose(lstm(long), h[-1], atol=1e-6) and lstm.output_dim == 5
    with pytest.raises(ConfigError, match="kind must be one of"):
        TokenEncoder(vocab_size=20, kind="gru")


def test_sequence_identity_adds_the_context_at_every_step() -> None:
    enc = SequenceIdentityEncoder(5)
    x = torch.randn(2, 4, 5)
    assert torch.equal(enc(x), x)
    enc.attach_context(3)
    c = torch.randn(2, 3)
    assert torch.allclose(enc(x, c) - x, enc.context_join.proj(c).unsqueeze(1).expand(2, 4, 5))
    with pytest.raises(ValueError, match=r"\(batch, length, 5\)"):
        enc(torch.randn(2, 5))


def test_vocab_size_comes_from_the_data() -> None:
    class Data:
        name, modalities, input_dims = "words", ["text"], {"text": 100}
        encoder_args = {"text": {"vocab_size": 37, "pad_id": 0}}

    backbone = OmegaConf.create({"text": {"_target_": "fusionbench.encoders.TokenEncoder", "embed_dim": 4}})
    assert build_encoders(backbone, Data()).text.embed.num_embeddings == 37
    backbone.text.vocab_size = 50  # the YAML wins where it sets the key
    assert build_encoders(backbone, Data()).text.embed.num_embeddings == 50


def make_task(groups, **kwargs) -> FusionTask:
    enc = {"a": SequenceIdentityEncoder(3), "b": TokenEncoder(vocab_size=10, embed_dim=4, kind="mean")}
    enc["b"].embed.weight.requires_grad_(False)
    model = ConcatFusion(enc, num_outputs=1)
    opt = lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)  # noqa: E731
    return FusionTask(model, "regression", 1, opt, optimizer_groups=groups, **kwargs)


def test_optimizer_groups_split_by_first_matching_regex() -> None:
    task = make_task(
        [{"match": r"head\..*bias", "lr": 0.1, "weight_decay": 0.0}, {"match": r"head\.", "lr": 0.5}]
    )
    groups = task.param_groups()
    names = {id(p): n for n, p in task.named_parameters()}
    by_lr = {g.get("lr"): sorted(names[id(p)] for p in g["params"]) for g in groups}
    assert by_lr[0.1] == ["model.head.0.bias"] and by_lr[0.5] == ["model.head.0.weight"]
    assert "model.encoders.b.embed.weight" not in sum(by_lr.values(), [])  # frozen: left out
    opt = task.optimizer_factory(params=groups)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.5] and opt.param_groups[0]["weight_decay"] == 0.0
    assert opt.param_groups[1]["weight_decay"] == 0.01  # the optimizer's default where a group is silent


def test_optimizer_groups_errors() -> None:
    with pytest.raises(TrainingError, match="match no trainable parameter.*encoders.text"):
        make_task([{"match": "encoders.text"}]).param_groups()
    with pytest.raises(TrainingError, match=r"unknown: \['momentum'\]"):
        make_task([{"match": "head", "momentum": 0.9}]).param_groups()
    with pytest.raises(TrainingError, match="scheduler_interval"):
        make_task(None, scheduler_interval="batch")


def test_linear_warmup_by_hand() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = linear_warmup(opt, total_steps=10, warmup=0.2)
    lrs = []
    for _ in range(11):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 1.0, 2.0, 1.75, 1.5, 1.25, 1.0, 0.75, 0.5, 0.25, 0.0])
    with pytest.raises(ValueError, match="share of the training steps"):
        linear_warmup(opt, 10, warmup=1.0)


def test_constant_baseline_learns_the_training_mean_and_costs_nothing() -> None:
    """fusion=constant: one learned output for every sample; under MSE it converges to the targets' mean (the
    floor of results/mosi_text.md), and it counts zero multiply-adds."""
    from fusionbench.compute import count_madds
    from fusionbench.fusion import ConstantFusion

    model = ConstantFusion({"text": TokenEncoder(vocab_size=5)}, num_outputs=1)
    assert [n for n, _ in model.named_parameters()] == ["bias"]  # the encoders are not kept
    x = {"text": tokens([[2, 3]] * 4, 3)}
    y = torch.tensor([[1.0], [2.0], [-0.5], [0.3]])
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x).logits, y).backward()
        opt.step()
    assert model(x).logits.shape == (4, 1)
    assert torch.allclose(model(x).logits, y.mean().expand(4, 1), atol=1e-5)
    assert count_madds(model.eval(), x).madds == 0
