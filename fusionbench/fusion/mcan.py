"""MCAN (Yu et al. 2019, "Deep Modular Co-Attention Networks for Visual Question Answering") and MCAN + DEQ
fusion (Ni et al., "Deep Equilibrium Multimodal Fusion", Table 4), written from the paper and the facts of the
public code (MILVLG/mcan-vqa 6b165e9: ``core/model/net.py``, ``mca.py``, ``net_utils.py``, ``cfgs/*.yml``).

Inputs (the VQA batch contract): ``image`` (B, N, 2048) bottom-up region features, all-zero rows = padding;
``question`` (B, L) word ids, 0 = padding. Both arrive through pass-through encoders
(configs/backbone/vqa.yaml): MCAN's word embedding, LSTM and image projection are part of this module.

    Y = LSTM(Embed(q)) in R^{L x d};   X = W_x v + b_x in R^{N x d};   masks: q_j = 0, sum_k |v_jk| = 0

    MHA(Q_in, K_in): head_i = softmax(Q_i K_i^T / sqrt(d_h) + M) V_i with Q_i, K_i, V_i linear maps of
        Q_in, K_in, K_in to d_h = d / h, M = -inf at the keys' padding; out = W_o [head_1; ...; head_h]
    FFN(x) = W_2 Dropout(ReLU(W_1 x + b_1)) + b_2                        (d -> d_ff -> d)
    SA(Y):     Y <- LN(Y + MHA(Y, Y));  Y <- LN(Y + FFN(Y))
    SGA(X, Y): X <- LN(X + MHA(X, X));  X <- LN(X + MHA(X, Y));  X <- LN(X + FFN(X))
    encoder-decoder (MCAN's default "MCA_ED"): Y <- SA^(L)...SA^(1)(Y), then X <- SGA^(l)(X, Y^(L)) l = 1..L
    AttFlat(Z): a = softmax_j(MLP(Z)_j, masked) in R^{n x G}  (MLP: d -> d_mlp -> ReLU, dropout -> G);
        z~ = W_m [sum_j a_j1 z_j; ...; sum_j a_jG z_j] + b_m in R^{d_out}
    fusion (``fusion_point="sum"``, MCAN):  f = AttFlat_q(Y) + AttFlat_x(X)
    head: logits = W_p LN(f) + b_p in R^{3129} (sigmoid + BCE in the task)

LN is MCAN's own LayerNorm: a (x - mean) / (std + 1e-6) + b with the unbiased std (not torch's LayerNorm).
Dropout (0.1) sits on the attention maps, on both residual branches' outputs, inside the FFN and AttFlat MLPs,
as in the code; the embedding and the LSTM have none. Initialisation: torch's defaults (the code sets none),
the embedding from GloVe when ``glove_file`` is given.

MCAN + DEQ (``fusion_point="deq"``): the DEQ code for VQA is not public; this module puts DEQ fusion at MCAN's
fusion point, where Table 4 says it "replaces the fusion method": the two AttFlat vectors are the injected
features x_image, x_question of a `fusionbench.fusion.DEQFusion` layer (built over IdentityEncoder(d_out)
encoders named ``image`` and ``question``, options from ``deq_args``), and its equilibrium z_fuse* replaces
their sum before MCAN's LayerNorm and classifier. The DEQ's solver statistics (``deq/*``) and Jacobian penalty
(``aux_loss``) are passed on; its own prediction head is removed (MCAN's is used).

Presets (``size``; every value can be overridden): small = cfgs/small_model.yml (d 512, 8 heads, d_ff 2048,
6 layers, AttFlat MLP 512, 1 glimpse, d_out 1024); large = cfgs/large_model.yml (d 1024, d_ff 4096,
d_out 2048; the code keeps 8 heads, so heads=8 here; d_ff = 4 d is set in cfgs/base_cfgs.py). The DEQ paper
(App. C) used the large setting. Parameters without the word embedding (V x 300): small 51,640,891, large
195,551,291; DEQ fusion adds 6,316,034 (small) / 25,214,978 (large) (tests/test_mcan.py counts them).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fusionbench.encoders.identity import IdentityEncoder
from fusionbench.errors import ConfigError, check_choices
from fusionbench.fusion.base import EncoderFusion
from fusionbench.fusion.deq import DEQFusion

log = logging.getLogger("fusionbench")

PRESETS: dict[str, dict[str, int]] = {
    "small": dict(hidden=512, heads=8, ff=2048, layers=6, flat_mlp=512, flat_glimpses=1, flat_out=1024),
    "large": dict(hidden=1024, heads=8, ff=4096, layers=6, flat_mlp=512, flat_glimpses=1, flat_out=2048),
}


class MCANLayerNorm(nn.Module):
    """MCAN's LayerNorm: ``a (x - mean) / (std + eps) + b`` with the unbiased standard deviation."""

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + self.eps) + self.bias


def _fill_masked(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # the code fills -1e9; the dtype's lowest value gives the same softmax and also fits float16
    return scores.masked_fill(mask, torch.finfo(scores.dtype).min)


class MultiHeadAttention(nn.Module):
    """``MHA(q_in, kv_in)``; ``key_mask`` (B, Lk) is True at padded keys."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.q, self.k, self.v, self.merge = (nn.Linear(hidden, hidden) for _ in range(4))
        self.dropout = nn.Dropout(dropout)

    def forward(self, q_in: torch.Tensor, kv_in: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b = q_in.shape[0]

        def split(x: torch.Tensor) -> torch.Tensor:  # (B, L, d) -> (B, h, L, d_h)
            return x.view(b, -1, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q(q_in)), split(self.k(kv_in)), split(self.v(kv_in))
        scores = _fill_masked(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim), key_mask[:, None, None, :])
        out = self.dropout(scores.softmax(-1)) @ v
        return self.merge(out.transpose(1, 2).reshape(b, -1, self.heads * self.head_dim))


class FeedForward(nn.Sequential):
    def __init__(self, hidden: int, ff: int, dropout: float) -> None:
        super().__init__(nn.Linear(hidden, ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ff, hidden))


class SelfAttentionUnit(nn.Module):
    """SA: self-attention then FFN, each with residual, dropout and LayerNorm."""

    def __init__(self, hidden: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.att = MultiHeadAttention(hidden, heads, dropout)
        self.ffn = FeedForward(hidden, ff, dropout)
        self.norm1, self.norm2 = MCANLayerNorm(hidden), MCANLayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, y: torch.Tensor, y_mask: torch.Tensor) -> torch.Tensor:
        y = self.norm1(y + self.dropout(self.att(y, y, y_mask)))
        return self.norm2(y + self.dropout(self.ffn(y)))


class GuidedAttentionUnit(nn.Module):
    """SGA: self-attention on X, attention from X to the guide Y, then FFN."""

    def __init__(self, hidden: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.self_att = MultiHeadAttention(hidden, heads, dropout)
        self.guided_att = MultiHeadAttention(hidden, heads, dropout)
        self.ffn = FeedForward(hidden, ff, dropout)
        self.norm1, self.norm2, self.norm3 = (MCANLayerNorm(hidden) for _ in range(3))
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, x_mask: torch.Tensor, y_mask: torch.Tensor
    ) -> torch.Tensor:
        x = self.norm1(x + self.dropout(self.self_att(x, x, x_mask)))
        x = self.norm2(x + self.dropout(self.guided_att(x, y, y_mask)))
        return self.norm3(x + self.dropout(self.ffn(x)))


class AttFlat(nn.Module):
    """Attentional reduction of a (B, n, d) sequence to (B, d_out) with ``glimpses`` attention maps."""

    def __init__(self, hidden: int, mlp: int, glimpses: int, out: int, dropout: float) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(hidden, mlp), nn.ReLU(), nn.Dropout(dropout), nn.Linear(mlp, glimpses)
        )
        self.merge = nn.Linear(hidden * glimpses, out)

    def forward(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        att = _fill_masked(self.mlp(z), mask[:, :, None]).softmax(dim=1)  # (B, n, G)
        pooled = torch.einsum("bng,bnd->bgd", att, z).flatten(1)  # glimpses concatenated: [g1 d | g2 d ...]
        return self.merge(pooled)


def load_glove(path: str | Path, vocab: list[str], dim: int) -> tuple[torch.Tensor, int]:
    """(len(vocab), dim) GloVe rows for ``vocab`` from a text file ``word v_1 ... v_dim``; words the file
    lacks (and id 0 / 1, padding / unknown) keep zero rows, as spaCy's vectors give MCAN for unknown words."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"fusion.glove_file={path} does not exist. Give a GloVe text file (e.g. glove.840B.300d.txt) or "
            "null to learn the word embedding from scratch."
        )
    index = {w: i for i, w in enumerate(vocab) if i > 1}
    weight = np.zeros((len(vocab), dim), dtype=np.float32)
    found = 0
    with path.open(encoding="utf8", errors="replace") as f:
        for line in f:
            parts = line.rstrip().split(" ")
            word = " ".join(parts[:-dim])  # a few GloVe 840B tokens contain spaces
            if word not in index:
                continue
            if len(parts) < dim + 1:
                raise ConfigError(f"{path}: a line has {len(parts) - 1} values, fusion.word_dim={dim}.")
            weight[index.pop(word)] = np.asarray(parts[-dim:], dtype=np.float32)
            found += 1
    return torch.from_numpy(weight), found


class MCANFusion(EncoderFusion):
    """MCAN (encoder-decoder MCA) with MCAN's sum or DEQ fusion at its fusion point (module docstring).

    Args:
        encoders: ``image`` (a (B, N, F) pass-through, ``output_dim`` F) and ``question`` (a word-id
            pass-through whose ``output_dim``/``vocab_size`` is the vocabulary size, e.g.
            `fusionbench.encoders.identity.TokenIdentityEncoder`).
        num_outputs: answers (3129).
        size: ``small`` or ``large`` preset; hidden, heads, ff, layers, flat_mlp, flat_glimpses, flat_out
            override it one by one.
        dropout: MCAN's DROPOUT_R.
        word_dim: word embedding width (300, GloVe's).
        vocab_size: word ids (default: the question encoder's).
        glove_file: GloVe text file initialising the embedding for the question encoder's ``vocab`` (null:
            learned from N(0, 1), torch's default).
        fusion_point: ``sum`` (MCAN) or ``deq`` (DEQ fusion of the two AttFlat vectors).
        deq_args: `DEQFusion` options for ``deq`` (f_max_iter, jac_weight, ...).
    """

    def __init__(
        self,
        encoders,
        num_outputs: int,
        size: str = "small",
        hidden: int | None = None,
        heads: int | None = None,
        ff: int | None = None,
        layers: int | None = None,
        flat_mlp: int | None = None,
        flat_glimpses: int | None = None,
        flat_out: int | None = None,
        dropout: float = 0.1,
        word_dim: int = 300,
        vocab_size: int | None = None,
        glove_file: str | None = None,
        fusion_point: str = "sum",
        deq_args: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(encoders, num_outputs)
        check_choices(
            "fusion", {"size": (size, tuple(PRESETS)), "fusion_point": (fusion_point, ("sum", "deq"))}
        )
        if self.modalities != ["image", "question"]:
            raise ConfigError(
                f"MCAN reads the modalities image and question, the backbone built {self.modalities}. "
                "Use dataset=vqa with backbone=vqa."
            )
        given = dict(
            hidden=hidden,
            heads=heads,
            ff=ff,
            layers=layers,
            flat_mlp=flat_mlp,
            flat_glimpses=flat_glimpses,
            flat_out=flat_out,
        )
        cfg = PRESETS[size] | {k: int(v) for k, v in given.items() if v is not None}
        if cfg["hidden"] % cfg["heads"]:
            raise ConfigError(
                f"fusion.hidden={cfg['hidden']} must be divisible by fusion.heads={cfg['heads']}."
            )
        self.sizes = cfg
        d = cfg["hidden"]
        question = self.encoders["question"]
        vocab_size = vocab_size or getattr(question, "vocab_size", None) or question.output_dim
        self.vocab_size = int(vocab_size)
        self.embedding = nn.Embedding(self.vocab_size, word_dim)
        if glove_file:
            vocab = getattr(question, "vocab", None)
            if vocab is None:
                raise ConfigError(
                    "fusion.glove_file needs the question vocabulary (words by id): the dataset must pass it "
                    "as encoder_args['question']['vocab'] to the question encoder (TokenIdentityEncoder), "
                    "or set fusion.glove_file=null."
                )
            weight, found = load_glove(glove_file, list(vocab), word_dim)
            with torch.no_grad():
                self.embedding.weight.copy_(weight)
            log.info(
                "MCAN: GloVe vectors for %d of %d question words (%s)", found, len(vocab) - 2, glove_file
            )
        self.lstm = nn.LSTM(word_dim, d, num_layers=1, batch_first=True)
        self.image_proj = nn.Linear(self.encoders["image"].output_dim, d)
        unit = (d, cfg["heads"], cfg["ff"], dropout)
        self.encoder_layers = nn.ModuleList(SelfAttentionUnit(*unit) for _ in range(cfg["layers"]))
        self.decoder_layers = nn.ModuleList(GuidedAttentionUnit(*unit) for _ in range(cfg["layers"]))
        flat = (d, cfg["flat_mlp"], cfg["flat_glimpses"], cfg["flat_out"], dropout)
        self.flat_question, self.flat_image = AttFlat(*flat), AttFlat(*flat)
        self.fusion_point = fusion_point
        self.deq: DEQFusion | None = None
        if fusion_point == "deq":
            width = cfg["flat_out"]
            self.deq = DEQFusion(
                {"image": IdentityEncoder(width), "question": IdentityEncoder(width)},
                1,
                **dict(deq_args or {}),
            )
            self.deq.head = nn.Identity()  # MCAN's LayerNorm + classifier read z_fuse*; no unused parameters
        elif deq_args:
            raise ConfigError("fusion.deq_args is set but fusion.fusion_point=sum; use fusion_point=deq.")
        self.fused_dim = cfg["flat_out"]
        self.head = nn.Sequential(MCANLayerNorm(self.fused_dim), nn.Linear(self.fused_dim, self.num_outputs))

    def features(self, image: torch.Tensor, question: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two AttFlat vectors (image, question), each (B, flat_out)."""
        if image.dim() != 3 or question.dim() != 2 or image.shape[0] != question.shape[0]:
            raise ValueError(
                f"MCAN expects image (B, N, F) and question ids (B, L), got {tuple(image.shape)}, "
                f"{tuple(question.shape)}"
            )
        question = question.long()
        q_mask = question == 0
        x_mask = image.abs().sum(-1) == 0
        y, _ = self.lstm(self.embedding(question))  # padding trails, so it never reaches a real word's state
        x = self.image_proj(image)
        for layer in self.encoder_layers:
            y = layer(y, q_mask)
        for layer in self.decoder_layers:
            x = layer(x, y, x_mask, q_mask)
        return self.flat_image(x, x_mask), self.flat_question(y, q_mask)

    def combine(
        self, embeddings: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        image, question = self.features(embeddings["image"], embeddings["question"])
        if self.deq is None:
            return image + question, None, {}
        return self.deq.combine({"image": image, "question": question})

    def fuse(self, embeddings: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.combine(embeddings)[0]

    def deq_inputs(
        self, inputs: Mapping[str, torch.Tensor]
    ) -> tuple[DEQFusion | None, dict[str, torch.Tensor]]:
        """The DEQ layer (None with ``fusion_point=sum``) and what it fuses, the two AttFlat vectors: what
        `fusionbench.fusion.deq.callbacks.deq_diagnostics` traces."""
        embeddings = self.encode(inputs)
        image, question = self.features(embeddings["image"], embeddings["question"])
        return self.deq, {"image": image, "question": question}
