"""Pretrained text encoders (BERT, XLNet, ...) loaded from local folders through ``transformers``.

fusionbench never downloads weights: ``pretrained`` is a folder written by ``model.save_pretrained(DIR)``
and ``tokenizer.save_pretrained(DIR)`` (the dataset reads the tokenizer from the same folder). Without
one, ``config`` builds a randomly initialised model of that architecture (tests use a 2-layer, 32-wide
BERT from `tiny_config`; `save_tiny_pretrained` writes such a model and a WordPiece tokenizer in the
layout users have).

Input: the token modality of the batch contract, a LongTensor (B, 2, L) of token ids and attention mask
(`split_tokens`). Output: one vector per sample (``output="pooled"``) or the last hidden states
(``output="sequence"``, for fusions that work on tokens: CM-BERT, MAG).

Edits: `hidden_states(x, edits)` applies ``edits[k]`` to the hidden states (B, L, H) after block k
(0 = the embedding output, i = after transformer layer i), through forward hooks, so one mechanism serves
every architecture: MAG-BERT shifts the embedding output (k = 0), MAG-XLNet the output of layer 1.
Pro-Fusion's context (`ContextEncoder`) is such an edit: ``h + B c`` at every token after block
``join_layer`` (the paper does not say where the context enters a pretrained encoder; layer 0, with the
word embeddings, is the default and the closest reading of its eq. 7 ``G_i([x_i, W_i c])``).

Freezing: ``freeze_embeddings`` (CM-BERT freezes its embedding layer), ``freeze_layers`` (the first k
transformer layers) or ``freeze_all``. Per-group learning rates (BERT at 2e-5, the fusion at 0.01) are
set on the optimizer (``optimizer_groups`` in the task), not here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusionbench.encoders.context import ContextEncoder
from fusionbench.errors import ConfigError

Edit = Callable[[torch.Tensor], torch.Tensor]
OUTPUTS = ("pooled", "sequence")
POOLS = ("cls", "mean", "pooler")
HOW_TO_SAVE = (
    'Save a model and its tokenizer into one folder on a machine with internet, e.g. `python -c "from '
    "transformers import AutoModel, AutoTokenizer as T; n='bert-base-uncased'; AutoModel.from_pretrained(n)"
    ".save_pretrained('DIR'); T.from_pretrained(n).save_pretrained('DIR')\"`, copy DIR here and point "
    "`backbone.text.pretrained=DIR` at it (default location: `paths.pretrained_dir`, env "
    "FUSIONBENCH_PRETRAINED_DIR). fusionbench never downloads weights."
)


def split_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The token modality (B, 2, L) -> (ids (B, L), attention mask (B, L)), both long."""
    if x.dim() != 3 or x.shape[1] != 2:
        raise ValueError(
            f"a token modality is (batch, 2, length), token ids and mask; got shape {tuple(x.shape)}"
        )
    x = x.long()
    return x[:, 0], x[:, 1]


def load_model(pretrained: str | None, config: Mapping[str, Any] | None) -> nn.Module:
    """``AutoModel`` from a local folder (never the hub), or randomly initialised from ``config``."""
    from transformers import AutoConfig, AutoModel

    if pretrained is not None:
        folder = Path(pretrained)
        if not (folder / "config.json").is_file():
            what = "does not exist" if not folder.exists() else "has no config.json"
            raise ConfigError(f"backbone.text.pretrained={pretrained} {what}. {HOW_TO_SAVE}")
        try:
            return AutoModel.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(
                f"Could not load a model from {folder} ({type(e).__name__}: {e}). {HOW_TO_SAVE}"
            ) from None
    if config is None:
        raise ConfigError(
            "backbone.text needs `pretrained` (a folder with a saved model) or `config` (a random "
            f"initialisation, e.g. {{model_type: bert, hidden_size: 32, ...}}). {HOW_TO_SAVE}"
        )
    args = dict(config)
    model_type = args.pop("model_type", None)
    if model_type is None:
        raise ConfigError("backbone.text.config needs `model_type` (bert, xlnet, roberta, ...).")
    return AutoModel.from_config(AutoConfig.for_model(model_type, **args))


def _blocks(model: nn.Module) -> list[nn.Module]:
    """[embedding module, layer 1, ..., layer n] of the architectures fusionbench uses."""
    if hasattr(model, "embeddings") and hasattr(getattr(model, "encoder", None), "layer"):  # BERT family
        return [model.embeddings, *model.encoder.layer]
    if hasattr(model, "word_embedding") and hasattr(model, "layer"):  # XLNet
        return [model.word_embedding, *model.layer]
    raise ConfigError(
        f"{type(model).__name__} is not supported as a text backbone (BERT-family and XLNet models are)."
    )


class PretrainedTextEncoder(ContextEncoder):
    """A ``transformers`` text model on the token modality (module docstring).

    Args:
        pretrained: folder of a saved model (``save_pretrained``); never downloaded.
        config: random initialisation instead, ``{"model_type": "bert", "hidden_size": 32, ...}``.
        output: ``pooled`` (B, H) or ``sequence`` (B, L, H).
        pool: ``cls`` (the classification token: first for BERT, last for XLNet), ``mean`` (over the
            attention mask) or ``pooler`` (BERT's tanh pooler on [CLS]).
        freeze_embeddings, freeze_layers, freeze_all: parameters excluded from training.
        dropout: overrides the model's hidden and attention dropout (None keeps the saved config's).
    """

    def __init__(
        self,
        pretrained: str | None = None,
        config: Mapping[str, Any] | None = None,
        output: str = "pooled",
        pool: str = "cls",
        freeze_embeddings: bool = False,
        freeze_layers: int = 0,
        freeze_all: bool = False,
        dropout: float | None = None,
    ) -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise ConfigError(f"backbone.text.output must be one of {OUTPUTS}, got {output!r}.")
        if pool not in POOLS:
            raise ConfigError(f"backbone.text.pool must be one of {POOLS}, got {pool!r}.")
        self.model = load_model(pretrained, config)
        self.model.train()  # from_pretrained returns eval mode; Lightning would keep the model's dropout off
        self.model_type = str(self.model.config.model_type)
        if pool == "pooler" and getattr(self.model, "pooler", None) is None:
            raise ConfigError(f"backbone.text.pool=pooler: a {self.model_type} model has no pooler; use cls.")
        self.output, self.pool = output, pool
        self.hidden = self.output_dim = int(self.model.config.hidden_size)
        self.blocks = _blocks(self.model)
        self.num_layers = len(self.blocks) - 1
        self.time_major = self.model_type == "xlnet"  # XLNet runs (L, B, H) internally
        if dropout is not None:
            for module in self.model.modules():
                if isinstance(module, nn.Dropout):
                    module.p = float(dropout)
        self._freeze(freeze_embeddings, int(freeze_layers), freeze_all)
        self._edits: dict[int, Edit] = {}
        for k, block in enumerate(self.blocks):
            block.register_forward_hook(self._hook(k))

    def _freeze(self, embeddings: bool, layers: int, everything: bool) -> None:
        if not 0 <= layers <= self.num_layers:
            raise ConfigError(
                f"backbone.text.freeze_layers={layers}: the model has {self.num_layers} layers."
            )
        frozen = list(self.model.parameters()) if everything else []
        if embeddings or layers:
            frozen += list(self.blocks[0].parameters())
            if self.model_type == "xlnet":
                frozen.append(self.model.mask_emb)
        for block in self.blocks[1 : layers + 1]:
            frozen += list(block.parameters())
        for p in frozen:
            p.requires_grad_(False)

    def _hook(self, k: int) -> Callable:
        def hook(module: nn.Module, args: Any, out: Any) -> Any:
            edit = self._edits.get(k)
            if edit is None:
                return None
            h = out[0] if isinstance(out, tuple) else out
            if self.time_major:
                h = edit(h.transpose(0, 1)).transpose(0, 1)
            else:
                h = edit(h)
            return (h, *out[1:]) if isinstance(out, tuple) else h

        return hook

    # -- Pro-Fusion ----------------------------------------------------------------------------
    def join_widths(self) -> list[int]:
        return [self.hidden] * (self.num_layers + 1)

    def _context_edit(self, context: torch.Tensor) -> tuple[int, Edit]:
        joint = self._modules["context_join"]
        return joint.layer, lambda h: h + joint.proj(context).unsqueeze(1).to(h.dtype)

    # -- forward -------------------------------------------------------------------------------
    def hidden_states(
        self,
        x: torch.Tensor,
        edits: Mapping[int, Edit] | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last hidden states (B, L, H), with ``edits`` (and the context) applied after their blocks."""
        ids, mask = split_tokens(x)
        edits = dict(edits or {})
        if context is not None and self._modules.get("context_join") is not None:
            k, add = self._context_edit(context)
            inner = edits.get(k)
            edits[k] = add if inner is None else (lambda h, f=inner: add(f(h)))
        bad = [k for k in edits if not 0 <= k <= self.num_layers]
        if bad:
            raise ConfigError(f"edits after blocks {bad}: the model has blocks 0..{self.num_layers}.")
        self._edits = edits
        try:
            out = self.model(input_ids=ids, attention_mask=mask)
        finally:
            self._edits = {}
        return out.last_hidden_state

    def pooled(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The configured pooling of hidden states (B, L, H) under the attention mask (B, L)."""
        if self.pool == "mean":
            w = mask.to(h.dtype).unsqueeze(-1)
            return (h * w).sum(1) / w.sum(1).clamp_min(1.0)
        if self.pool == "pooler":
            return self.model.pooler(h)
        return h[:, -1] if self.model_type == "xlnet" else h[:, 0]  # XLNet's <cls> is last (left padding)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        h = self.hidden_states(x, context=context)
        return h if self.output == "sequence" else self.pooled(h, split_tokens(x)[1])


# -- fixtures ----------------------------------------------------------------------------------
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def tiny_config(model_type: str = "bert", vocab_size: int = 128) -> dict[str, Any]:
    """A 2-layer, 32-wide, 2-head random model for tests (``backbone.text.config``)."""
    if model_type == "xlnet":
        return dict(model_type="xlnet", vocab_size=vocab_size, d_model=32, n_layer=2, n_head=2, d_inner=64)
    return dict(
        model_type=model_type,
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )


def save_tiny_pretrained(folder: str | Path, model_type: str = "bert", words: Sequence[str] = ()) -> Path:
    """Write a tiny random model and a lower-case WordPiece tokenizer (vocabulary: the special tokens,
    ``words``, and every letter and digit alone and as a ``##`` piece, so no word is unknown) with
    ``save_pretrained``: the folder layout ``backbone.text.pretrained`` and ``dataset.tokenizer`` read.
    For ``xlnet`` the model is an XLNet and the tokenizer still WordPiece (tests only)."""
    from transformers import AutoConfig, AutoModel, BertTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = "abcdefghijklmnopqrstuvwxyz0123456789'"
    vocab = list(dict.fromkeys([*SPECIALS, *(w.lower() for w in words), *chars, *(f"##{c}" for c in chars)]))
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    args = tiny_config(model_type, len(vocab))
    model = AutoModel.from_config(AutoConfig.for_model(args.pop("model_type"), **args))
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder
