"""A text encoder trained from scratch on word ids (no pretrained weights): the text-only MOSI model.

Input: the token modality (B, 2, L), ids and attention mask (`fusionbench.encoders.pretrained.split_tokens`),
ids from a word vocabulary built on the training split (``dataset.tokenizer=words``; ``vocab_size`` comes from
the data through ``encoder_args``). An embedding table (id 0 = padding) feeds either

- ``kind="lstm"``: an LSTM over the real tokens only (packed, so padding never enters the state); output =
  the last hidden state of the top layer (both directions concatenated when ``bidirectional``), or
- ``kind="mean"``: the mean of the real tokens' embeddings (a bag of words).

Pro-Fusion's context joins at layer 0 as for the other sequence encoders: ``B c`` is added to every token's
embedding (the same function as concatenating c to each embedding before a linear input map).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from fusionbench.encoders.context import ContextEncoder
from fusionbench.encoders.pretrained import split_tokens
from fusionbench.errors import ConfigError

KINDS = ("lstm", "mean")


class TokenEncoder(ContextEncoder):
    """Args:
    vocab_size: rows of the embedding table (from the data: ``encoder_args``).
    embed_dim: embedding width.
    kind: ``lstm`` or ``mean`` (module docstring).
    hidden: LSTM width per direction.
    layers: stacked LSTM layers.
    bidirectional: a bidirectional LSTM (output ``2 * hidden``).
    dropout: dropout on the embeddings and between LSTM layers.
    pad_id: the padding id (0 in fusionbench's word vocabularies).
    """

    width_key = "hidden"

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 128,
        kind: str = "lstm",
        hidden: int = 128,
        layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
        pad_id: int = 0,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ConfigError(f"backbone.text.kind must be one of {KINDS}, got {kind!r}.")
        if int(vocab_size) < 2:
            raise ConfigError(
                f"backbone.text.vocab_size={vocab_size}: the vocabulary needs padding and words."
            )
        self.kind, self.pad_id = kind, int(pad_id)
        self.embed = nn.Embedding(int(vocab_size), int(embed_dim), padding_idx=self.pad_id)
        self.drop = nn.Dropout(float(dropout))
        self.embed_dim = int(embed_dim)
        if kind == "lstm":
            self.lstm = nn.LSTM(
                self.embed_dim,
                int(hidden),
                int(layers),
                batch_first=True,
                bidirectional=bool(bidirectional),
                dropout=float(dropout) if layers > 1 else 0.0,
            )
            self.output_dim = int(hidden) * (2 if bidirectional else 1)
        else:
            self.width_key = "embed_dim"
            self.output_dim = self.embed_dim

    def join_widths(self) -> list[int]:
        return [self.embed_dim]

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        ids, mask = split_tokens(x)
        e = self.join(0, self.embed(ids).transpose(1, 2), context).transpose(1, 2)  # channels on axis 1
        e = self.drop(e) * mask.unsqueeze(-1).to(e.dtype)
        lengths = mask.sum(1).clamp_min(1)
        if self.kind == "mean":
            return e.sum(1) / lengths.unsqueeze(-1).to(e.dtype)
        packed = pack_padded_sequence(e, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)
        if self.lstm.bidirectional:
            return torch.cat([h[-2], h[-1]], dim=-1)
        return h[-1]
