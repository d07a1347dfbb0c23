"""Pass-through encoder for features that are already embeddings (and for wrapped fusions)."""

from __future__ import annotations

import torch
from torch import nn

from fusionbench.encoders.context import ContextEncoder
from fusionbench.errors import ConfigError


class IdentityEncoder(ContextEncoder):
    """Returns its input flattened to (B, input_dim); ``output_dim = input_dim``. With a context it
    returns ``x + B c``, Pro-Fusion's eq. 7 literally."""

    def __init__(self, input_dim: int) -> None:
        super().__init__()
        self.input_dim = self.output_dim = int(input_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.join(0, x.flatten(1), context)

    def join_widths(self) -> list[int]:
        return [self.input_dim]


class SequenceIdentityEncoder(ContextEncoder):
    """Returns a (B, L, d) sequence unchanged (per-token features that a fusion reads step by step, such as
    CM-BERT's word-aligned audio); ``output_dim = in_features``. With a context: ``x_t + B c`` at every step.
    """

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.in_features = self.output_dim = int(in_features)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"SequenceIdentityEncoder expects (batch, length, {self.in_features}), got {tuple(x.shape)}"
            )
        joint = self._modules.get("context_join")
        if context is None or joint is None:
            return x
        return x + joint.proj(context).unsqueeze(1).to(x.dtype)

    def join_widths(self) -> list[int]:
        return [self.in_features]


class TokenIdentityEncoder(nn.Module):
    """Passes word ids (B, L) through unchanged, for fusions that embed the words themselves (MCAN's
    embedding + LSTM sits inside `fusionbench.fusion.mcan.MCANFusion`). ``output_dim = vocab_size`` (the
    number of ids, 0 = padding), filled from the dataset's ``encoder_args`` when the YAML leaves it unset;
    ``vocab`` (the words, index = id) is kept for GloVe initialisation when the dataset provides it."""

    def __init__(self, vocab_size: int | None = None, vocab: list[str] | None = None) -> None:
        super().__init__()
        if vocab_size is None or int(vocab_size) < 2:
            raise ConfigError(
                f"TokenIdentityEncoder needs the vocabulary size (got {vocab_size!r}): the dataset "
                "provides it as encoder_args[<modality>]['vocab_size'], or set "
                "`backbone.<modality>.vocab_size`."
            )
        if vocab is not None and len(vocab) != int(vocab_size):
            raise ConfigError(
                f"TokenIdentityEncoder: vocab has {len(vocab)} words but vocab_size={vocab_size}."
            )
        self.vocab_size = self.output_dim = int(vocab_size)
        self.vocab = list(vocab) if vocab is not None else None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is not None:
            raise ConfigError(
                "TokenIdentityEncoder passes word ids through and cannot take a context vector."
            )
        if x.dim() != 2 or x.is_floating_point():
            raise ValueError(
                f"TokenIdentityEncoder expects integer word ids (batch, length), got {x.dtype} "
                f"{tuple(x.shape)}"
            )
        return x
