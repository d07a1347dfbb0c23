"""CM-BERT (Yang, Xu & Gao, "CM-BERT: Cross-Modal BERT for Text-Audio Sentiment Analysis", ACM MM 2020):
BERT's last hidden states re-weighted by a masked multimodal attention built from text and word-aligned
audio, the base model of DEQ fusion's CMU-MOSI experiments (DEQ paper Table 3).

As the public code computes it (thuiar/Cross-Modal-BERT ``model.py``, class ``BertFinetun``), with H (B, L, h)
the text encoder's last hidden states, a (B, L, 5) the audio, m (B, L) the attention mask:

    T = Conv1x1_t(H) / sqrt(||Conv1x1_t(H)||)        Conv1d(h -> 30, no bias); the norm is the 2-norm of the
                                                       whole batch's projection, detached (``text_scale``)
    P = Conv1x1_a(a)                                   Conv1d(5 -> 30, no bias)
    A_t = ReLU(T T^T),  A_a = ReLU(P P^T)              (B, L, L) self-similarities (`attention_logits`)
    S = w_t A_t + w_a A_a + b                          scalars w_t = w_a = 1, b = 0 at init (`weighted`)
    M = -10000 (1 - m)                                 BERT's extended mask, added along rows and columns:
    W = Dropout_0.3(softmax_row(S + M[:, None, :] + M[:, :, None]))
    F = W H + H                                        attend over the hidden states, residual
    y = head(Dropout(LayerNorm(Dropout(Linear(F)))[CLS]))     Linear(h, h), LayerNorm eps 1e-12, head
                                                              Linear(h, 1)

The padded keys of a real query get weight ~e^-10000 = 0; a padded query row is shifted by -10000 as a
whole and so still attends to the real keys (only the [CLS] row reaches the prediction anyway).

Choices of the code kept here (and where they differ from the paper or from habit):
- The text scale is one number for the whole batch, computed in numpy (no gradient through it): a
  sample's prediction depends on the other samples of its batch, padded positions included.
  ``text_scale="sample"`` uses each sample's own norm instead (not the code). Both clamp the norm at 1e-12.
- The final regressor is frozen at its initialisation (``freeze_head=True``): the code's name-based freezing
  keeps ``BertFinetun``, the pooler and the encoder layers trainable and misses ``classifier``. It and the
  Linear(h, h) start as the code's ``init_bert_weights`` (normal, std 0.02, zero bias); the 1x1 convolutions
  keep PyTorch's default (``init_bert_weights`` does not touch convolutions).
- Dropout 0.1 (BERT's ``hidden_dropout_prob``) after the Linear(h, h) and on the [CLS] vector before the head.
  The code also applies it to the pooler output, which it then never uses; the pooler gets no gradient.
- The classification token is the first position (last for an XLNet encoder, whose <cls> ends the sequence).

Everything the code's ``BertFinetun`` holds is the submodule ``fusion`` (parameter names ``model.fusion.*``,
``model.base.fusion.*`` under Pro-Fusion), so an ``optimizer_groups`` regex such as ``(^|\\.)fusion\\.``
gives it the code's learning rate of 0.01; the code's no-decay rule is a substring match on ``bias`` /
``LayerNorm.weight``, which the scalar ``fusion.bias`` and the biases also match. The encoders are
``model.encoders.text`` (a `fusionbench.encoders.PretrainedTextEncoder` with ``output: sequence``) and
``model.encoders.audio`` (`fusionbench.encoders.SequenceIdentityEncoder`); the head is ``model.head.1``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fusionbench.encoders.pretrained import split_tokens
from fusionbench.errors import ConfigError
from fusionbench.fusion.base import EncoderFusion, FusionStep

MODALITIES = ("audio", "text")
TEXT_SCALES = ("batch", "sample")
MASK_VALUE = -10000.0  # BERT's extended attention mask, as the code adds it


class Conv1x1(nn.Conv1d):
    """``nn.Conv1d(c_in, c_out, 1)`` (same parameters and initialisation) computed as one matrix product on
    (B, c_in, L): the same numbers, several times faster on CPU than the convolution kernel."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.matmul(self.weight[:, :, 0], x)
        return out if self.bias is None else out + self.bias[:, None]


def bert_init(linear: nn.Linear, std: float = 0.02) -> nn.Linear:
    """``init_bert_weights`` of the code for a Linear layer: normal(0, std) weights, zero bias."""
    nn.init.normal_(linear.weight, 0.0, std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return linear


class MaskedMultimodalAttention(nn.Module):
    """The parameters and steps of the code's ``BertFinetun`` (module docstring), without the head.

    Args:
        hidden: width h of the text hidden states.
        audio_dim: audio features per token.
        proj_dim: width of both 1x1 projections (30).
        attention_dropout: dropout on the attention weights (0.3).
        dropout: dropout after the Linear(h, h) (BERT's 0.1).
        text_scale: ``batch`` (code) or ``sample``.
    """

    def __init__(
        self,
        hidden: int,
        audio_dim: int,
        proj_dim: int = 30,
        attention_dropout: float = 0.3,
        dropout: float = 0.1,
        text_scale: str = "batch",
    ) -> None:
        super().__init__()
        self.text_scale = text_scale
        self.proj_t = Conv1x1(hidden, proj_dim, bias=False)
        self.proj_a = Conv1x1(audio_dim, proj_dim, bias=False)
        self.text_weight = nn.Parameter(torch.ones(1))  # w_t
        self.audio_weight = nn.Parameter(torch.ones(1))  # w_a
        self.bias = nn.Parameter(torch.zeros(1))  # b
        self.attention_dropout = nn.Dropout(attention_dropout)
        self.dense = bert_init(nn.Linear(hidden, hidden))
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)  # BertLayerNorm(768): eps 1e-12

    def matrices(self, text_h: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_t, A_a), each (B, L, L): ReLU of the scaled text and the audio self-similarities."""
        t = self.proj_t(text_h.transpose(1, 2)).transpose(1, 2)  # (B, L, proj_dim)
        with torch.no_grad():  # the code takes the norm in numpy: no gradient through the scale
            norm = t.norm() if self.text_scale == "batch" else t.flatten(1).norm(dim=1).view(-1, 1, 1)
            scale = norm.clamp_min(1e-12).sqrt()
        t = t / scale
        a = self.proj_a(audio.transpose(1, 2)).transpose(1, 2)
        return torch.relu(t @ t.transpose(1, 2)), torch.relu(a @ a.transpose(1, 2))

    def weighted(self, a_t: torch.Tensor, a_a: torch.Tensor) -> torch.Tensor:
        """w_t A_t + w_a A_a + b, CM-BERT's fusion of the two matrices (DEQ fusion's injection)."""
        return self.text_weight * a_t + self.audio_weight * a_a + self.bias

    def weights(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Row softmax of ``scores`` (B, L, L) plus BERT's -10000 mask along rows and columns."""
        pad = (1.0 - mask.to(scores.dtype)) * MASK_VALUE  # (B, L)
        return torch.softmax(scores + pad[:, None, :] + pad[:, :, None], dim=-1)

    def attend(self, scores: torch.Tensor, text_h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked softmax of ``scores`` (B, L, L), attention over ``text_h``, residual, Linear, dropout,
        LayerNorm: the re-weighted hidden states (B, L, h)."""
        fused = self.attention_dropout(self.weights(scores, mask)) @ text_h + text_h
        return self.norm(self.dropout(self.dense(fused)))


class CMBERTFusion(EncoderFusion):
    """Args:
    encoders: exactly ``text`` (a `PretrainedTextEncoder` with ``output: sequence``, or any encoder
        returning (B, L, h) whose ``output`` is ``sequence``) and ``audio`` (word-aligned (B, L, d)).
    num_outputs: regression targets (1 for sentiment).
    proj_dim: width of the 1x1 projections before the self-similarities (30).
    attention_dropout: dropout on the attention weights (0.3).
    dropout: dropout after the Linear(h, h) and before the head (BERT's hidden dropout, 0.1).
    text_scale: ``batch`` (the code: one norm over the batch) or ``sample`` (module docstring).
    freeze_head: keep the final Linear(h, num_outputs) at its initialisation, as the code does.
    head_init_std: std of the head's normal initialisation (the code's ``initializer_range`` 0.02).
    """

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        num_outputs: int,
        proj_dim: int = 30,
        attention_dropout: float = 0.3,
        dropout: float = 0.1,
        text_scale: str = "batch",
        freeze_head: bool = True,
        head_init_std: float = 0.02,
    ) -> None:
        super().__init__(encoders, num_outputs)
        if tuple(self.modalities) != MODALITIES:
            raise ConfigError(
                f"CM-BERT fuses exactly the modalities {list(MODALITIES)} (token text and word-aligned "
                f"audio), got {self.modalities}. Use dataset=mosi_cmbert, or set "
                "`dataset.modalities=[audio,text]`."
            )
        text = self.encoders["text"]
        if getattr(text, "output", None) != "sequence":
            raise ConfigError(
                "CM-BERT attends over the text encoder's hidden states, but backbone.text "
                f"({type(text).__name__}) returns {getattr(text, 'output', 'one vector')!r}. Use "
                "fusionbench.encoders.PretrainedTextEncoder with `backbone.text.output=sequence`."
            )
        if text_scale not in TEXT_SCALES:
            raise ConfigError(f"fusion.text_scale must be one of {list(TEXT_SCALES)}, got {text_scale!r}.")
        if not 0 <= attention_dropout < 1 or not 0 <= dropout < 1 or proj_dim < 1:
            raise ConfigError(
                "fusion.attention_dropout and fusion.dropout must be in [0, 1) and fusion.proj_dim >= 1, got "
                f"{attention_dropout}, {dropout}, {proj_dim}."
            )
        self.hidden = int(text.output_dim)
        self.cls_index = -1 if getattr(text, "model_type", "bert") == "xlnet" else 0
        self.fusion = MaskedMultimodalAttention(
            self.hidden,
            int(self.encoders["audio"].output_dim),
            proj_dim,
            attention_dropout,
            dropout,
            text_scale,
        )
        self.fused_dim = self.hidden
        self.freeze_head, self.head_init_std, self.head_dropout = freeze_head, head_init_std, dropout
        self.build_head()

    def build_head(self) -> None:
        """Dropout -> Linear(h, num_outputs), initialised as the code and frozen with ``freeze_head``."""
        linear = nn.Linear(self.fused_dim, self.num_outputs)
        nn.init.normal_(linear.weight, 0.0, self.head_init_std)
        nn.init.zeros_(linear.bias)
        self.head = nn.Sequential(nn.Dropout(self.head_dropout), linear)
        if self.freeze_head:
            self.head.requires_grad_(False)

    # -- the attention -----------------------------------------------------------------------------
    def attention_logits(
        self, text_h: torch.Tensor, audio: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_t, A_a), the (B, L, L) text and audio self-similarity matrices. No mask enters them: the code
        computes them over every position (padding included) and masks only the fused scores."""
        if audio.dim() != 3 or audio.shape[:2] != text_h.shape[:2]:
            raise ConfigError(
                f"CM-BERT needs audio word-aligned to the token positions: text hidden states "
                f"{tuple(text_h.shape)}, audio {tuple(audio.shape)}; the first two dimensions (batch, "
                "dataset.max_seq_len) must agree."
            )
        return self.fusion.matrices(text_h, audio)

    def scores(
        self, a_t: torch.Tensor, a_a: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """The fused attention scores (B, L, L) before masking, an auxiliary loss and info. CM-BERT: the
        weighted sum; the DEQ variant replaces this."""
        return self.fusion.weighted(a_t, a_a), None, {}

    def fuse_tokens(
        self, text_h: torch.Tensor, audio: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """(the [CLS] vector (B, h), aux_loss, info) from hidden states, audio and the attention mask."""
        a_t, a_a = self.attention_logits(text_h, audio)
        scores, aux, info = self.scores(a_t, a_a)
        fused = self.fusion.attend(scores, text_h, mask)[:, self.cls_index]
        info = {
            "cmbert/w_t": self.fusion.text_weight.detach()[0],
            "cmbert/w_a": self.fusion.audio_weight.detach()[0],
            "cmbert/b": self.fusion.bias.detach()[0],
            **info,
        }
        return fused, aux, info

    # -- the fusion contract -----------------------------------------------------------------------
    def step(
        self, inputs: Mapping[str, torch.Tensor], context: Mapping[str, torch.Tensor] | None = None
    ) -> FusionStep:
        """Encoders (with Pro-Fusion's context) then the masked multimodal attention; the mask comes from
        the token modality (``inputs["text"][:, 1]``)."""
        embeddings = self.encode(inputs, context)
        mask = split_tokens(inputs["text"])[1]
        fused, aux, info = self.fuse_tokens(embeddings["text"], embeddings["audio"], mask)
        return FusionStep(fused, aux, info, embeddings)

    def combine(self, embeddings: Mapping[str, torch.Tensor]):
        raise ConfigError(
            "CM-BERT needs the token attention mask besides the encoder outputs: call `step(inputs)` or "
            "`forward(inputs)` (the mask is read from the text modality), not `combine(embeddings)`."
        )
