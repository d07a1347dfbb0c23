"""MUTAN (Ben-younes, Cadene, Cord, Thome, "MUTAN: Multimodal Tucker Fusion for Visual Question Answering",
ICCV 2017) with two-glimpse Mutan attention, the "Mutan" row of the DEQ paper's Table 4 (VQA-v2,
"Skip-thoughts + BottomUp"), and "Mutan + DEQ" (``fusion_point="deq"``).

Tucker fusion (paper §3; equation numbers of arXiv:1705.06676, written out so the code can be checked without
them). The bilinear answer model is a third-order tensor in Tucker form, eq. (1):
T = ((T_c x_1 W_q) x_2 W_v) x_3 W_o. With q~ = tanh(W_q q), v~ = tanh(W_v v) (eq. 3) the fused vector is
z = (T_c x_1 q~) x_2 v~ in R^{t_o} (eq. 4), i.e. z[k] = q~^T T_c[:, :, k] v~, and the answer scores y = W_o z.
The rank constraint (§3.4, eqs. 7-9) makes every slice of the core tensor rank R:
T_c[:, :, k] = sum_r m_r^k (n_r^k)^T, so z[k] = sum_r (q~^T m_r^k)(v~^T n_r^k) and, stacking the slices,

    z = sum_{r=1..R} z_r,   z_r = (q~^T M_r) * (v~^T N_r)        (M_r: t_q x t_o, N_r: t_v x t_o).

`TuckerFusion` computes exactly this (M_r, N_r with biases, as vqa.pytorch's ``MutanFusion`` R linear layers
per side; here the R maps of one side are one ``Linear(t, R * t_o)``, the same parameters and function);
``core_tensor()`` rebuilds T_c from the weights.

Architecture (Cadene/vqa.pytorch ``vqa/models/att.py`` ``MutanAtt``, ``fusion.py`` ``MutanFusion(2d)``, sizes
of ``options/vqa2/mutan_att_trainval.yaml``), on bottom-up regions v_i (2048) and the question vector q:
- attention: h_i = tanh(W_av drop_0.5(v_i)) (310), h_q = tanh(W_aq drop_0.5(q)) (310); m_i = Tucker(h_i, h_q)
  (R 5, 510; no activation, dropout_hv/hq 0 as the options file); G = 2 glimpse logits l_i = W_g drop_0.5(m_i)
  (the 1x1 conv), softmax over the regions, one attended vector a_g = sum_i alpha_gi v_i per glimpse.
- final fusion: x_v = [tanh(W_g' drop_0.5(a_g))]_g (2 x 310 = 620), x_q = tanh(W_fq drop_0.5(q)) (310),
  z = Tucker(x_v, x_q) (R 5, 510, no activation); classifier Linear(510, num_outputs) after dropout 0.5
  (no activation before it: the options file's ``classif`` sets none).
- masks (bottom-up inputs are zero-padded; the code's 14 x 14 grid needs none): image rows whose absolute sum
  is 0 get attention logit -inf (weight 0; an all-padding image attends uniformly over zero rows, i.e. a zero
  vector); question ids 0 are padding and never enter the GRU.

Departures from the code:
- Question encoder: skip-thoughts (BayesianUniSkip, 620 -> 2400 GRU, pretrained) weights are not available, so
  a GRU(embed_dim 300 -> 2400) is trained from scratch over learned embeddings, or GloVe vectors read from a
  local ``glove_file`` (the vocabulary's words: ``vocab``, else the question encoder's ``vocab`` attribute).
  The question vector is the GRU state at the last real token (questions are right-padded: MCAN's layout), as
  the skip-thoughts ``select_last``. BayesianUniSkip's dropout 0.25 is applied as one mask per question on the
  embeddings (variational on the inputs only; not on the recurrent state).
- Image features are bottom-up regions (B, 100, 2048) instead of a 14 x 14 ResNet grid: the 1x1 convolutions
  are per-region linear maps (the same operation), and padding rows are masked (above).
- Answers: the task's BCE on soft scores over 3129 answers (MCAN's vocabulary) instead of answer sampling +
  cross-entropy over 2000 answers.

Mutan + DEQ (the DEQ paper's VQA code is not public): ``fusion_point="deq"`` replaces the final Tucker fusion
by `fusionbench.fusion.DEQFusion` on its two inputs. Both are projected to one width d (``deq_width``, default
the final fusion's image width dim_hv = 620, divisible by DEQ's 4 GroupNorm groups): each glimpse's projection
outputs d / G (so x_v is Mutan's own 2 x 310 = 620 at the default) and the question projection outputs d
(instead of 310); the equilibrium z_fuse* (d) replaces z before the classifier (dropout 0.5, Linear(d, A)).
The attention, its Tucker fusion and the question GRU are unchanged. DEQFusion is built over
``IdentityEncoder(d)`` encoders named ``image`` and ``question`` from ``deq_args`` (keyword arguments, or a
partial of the class, which configs/fusion/mutan_deq.yaml composes from configs/fusion/deq.yaml); its own head
is unused and replaced by an identity. Its solver statistics (``deq/...``) and Jacobian penalty pass through
``info`` and ``aux_loss``, and `DEQMonitor` finds the inner module by type.

Encoders: pass-through (``image``: `SequenceIdentityEncoder(2048)`, ``question``: token ids unchanged),
configs/backbone/vqa.yaml; the question GRU and the image projections live here because the attention
interleaves them. Parameters: ``model.embed``, ``model.gru``, ``model.attention.*``,
``model.glimpse_proj.*``, ``model.question_proj``, ``model.fusion.*`` (mutan) or ``model.deq.*`` (deq),
``model.head``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from fusionbench.encoders.identity import IdentityEncoder
from fusionbench.errors import ConfigError, check_choices
from fusionbench.fusion.base import EncoderFusion
from fusionbench.fusion.deq import DEQFusion

log = logging.getLogger("fusionbench")

MODALITIES = ("image", "question")
FUSION_POINTS = ("mutan", "deq")


class TuckerFusion(nn.Module):
    """Rank-R Tucker fusion z = sum_r (W_q^r q + c_r) * (W_v^r v + b_r) (module docstring); inputs broadcast
    over leading axes, e.g. regions (B, N, t_v) with one question (B, 1, t_q)."""

    def __init__(self, dim_v: int, dim_q: int, dim_mm: int, rank: int) -> None:
        super().__init__()
        if min(dim_v, dim_q, dim_mm, rank) < 1:
            raise ConfigError(
                f"Tucker fusion widths and rank must be >= 1, got dim_v={dim_v}, dim_q={dim_q}, "
                f"dim_mm={dim_mm}, rank={rank}."
            )
        self.dim_mm, self.rank = int(dim_mm), int(rank)
        self.proj_v = nn.Linear(dim_v, rank * dim_mm)  # N_1..N_R stacked by rows
        self.proj_q = nn.Linear(dim_q, rank * dim_mm)  # M_1..M_R

    def forward(self, v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        zv = self.proj_v(v).unflatten(-1, (self.rank, self.dim_mm))
        zq = self.proj_q(q).unflatten(-1, (self.rank, self.dim_mm))
        return (zv * zq).sum(-2)  # sum over r of z_r

    def core_tensor(self) -> torch.Tensor:
        """T_c (t_q, t_v, t_o) with T_c[:, :, k] = sum_r m_r^k (n_r^k)^T: z[k] = q^T T_c[:, :, k] v for the
        bias-free part; every slice has rank <= R."""
        m = self.proj_q.weight.unflatten(0, (self.rank, self.dim_mm))  # (R, t_o, t_q)
        n = self.proj_v.weight.unflatten(0, (self.rank, self.dim_mm))  # (R, t_o, t_v)
        return torch.einsum("rkq,rkv->qvk", m, n)


class MutanAttention(nn.Module):
    """Mutan attention, G glimpses over N regions: weights (B, G, N) and attended vectors (B, G, dim_v)."""

    def __init__(
        self,
        dim_v: int,
        dim_q: int,
        dim_hv: int,
        dim_hq: int,
        dim_mm: int,
        rank: int,
        glimpses: int,
        dropout_v: float,
        dropout_q: float,
        dropout_mm: float,
    ) -> None:
        super().__init__()
        self.proj_v = nn.Linear(dim_v, dim_hv)  # the code's 1x1 Conv2d, per region
        self.proj_q = nn.Linear(dim_q, dim_hq)
        self.fusion = TuckerFusion(dim_hv, dim_hq, dim_mm, rank)
        self.glimpse_logits = nn.Linear(dim_mm, glimpses)  # the code's conv_att (1x1 Conv2d)
        self.drop_v, self.drop_q, self.drop_mm = (
            nn.Dropout(dropout_v),
            nn.Dropout(dropout_q),
            nn.Dropout(dropout_mm),
        )

    def forward(
        self, v: torch.Tensor, q: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """v (B, N, dim_v), q (B, dim_q), mask (B, N) True on real regions."""
        hv = torch.tanh(self.proj_v(self.drop_v(v)))
        hq = torch.tanh(self.proj_q(self.drop_q(q))).unsqueeze(1)  # one question for all regions
        logits = self.glimpse_logits(self.drop_mm(self.fusion(hv, hq))).transpose(1, 2)  # (B, G, N)
        logits = logits.masked_fill(~mask.unsqueeze(1), torch.finfo(logits.dtype).min)
        weights = torch.softmax(logits, dim=-1)
        return weights, weights @ v


class MutanFusion(EncoderFusion):
    """MUTAN with 2-glimpse attention, optionally with DEQ fusion at the final fusion (module docstring).

    Args:
        encoders: ``image`` (B, N, dim_v) region features and ``question`` (B, L) word ids, both pass-through.
        num_outputs: answers (3129).
        vocab_size: rows of the word embedding; default: the question encoder's ``vocab_size``.
        vocab: the words (index = id) for ``glove_file``; default: the question encoder's ``vocab``.
        glove_file: a local GloVe text file (``word v_1 ... v_embed_dim`` per line) initialising the
            embeddings of the vocabulary's words; null: random initialisation.
        embed_dim, question_dim, question_dropout: word embedding width, GRU width (skip-thoughts' 2400) and
            the embedding dropout (BayesianUniSkip's 0.25).
        att_dim_hv, att_dim_hq, att_dim_mm, att_rank, glimpses: the attention's Tucker fusion and glimpses.
        att_dropout_v, att_dropout_q, att_dropout_mm: dropouts of the attention.
        dim_hv, dim_hq, dim_mm, rank: the final Tucker fusion (dim_hv is split over the glimpses).
        dropout_v, dropout_q: dropouts before the final fusion's projections.
        classif_dropout: dropout before the classifier.
        fusion_point: ``mutan`` (final Tucker fusion) or ``deq`` (DEQ fusion of its two inputs).
        deq_width: DEQ fusion width (default ``dim_hv``), divisible by ``glimpses``.
        deq_args: `DEQFusion` keyword arguments, or a callable ``(encoders, num_outputs) -> DEQFusion``.
        head_hidden, head_dropout: see `EncoderFusion` (Mutan's classifier is one linear layer).
    """

    def __init__(
        self,
        encoders,
        num_outputs: int,
        vocab_size: int | None = None,
        vocab: Sequence[str] | None = None,
        glove_file: str | None = None,
        embed_dim: int = 300,
        question_dim: int = 2400,
        question_dropout: float = 0.25,
        att_dim_hv: int = 310,
        att_dim_hq: int = 310,
        att_dim_mm: int = 510,
        att_rank: int = 5,
        glimpses: int = 2,
        att_dropout_v: float = 0.5,
        att_dropout_q: float = 0.5,
        att_dropout_mm: float = 0.5,
        dim_hv: int = 620,
        dim_hq: int = 310,
        dim_mm: int = 510,
        rank: int = 5,
        dropout_v: float = 0.5,
        dropout_q: float = 0.5,
        classif_dropout: float = 0.5,
        fusion_point: str = "mutan",
        deq_width: int | None = None,
        deq_args: Mapping | Callable[..., DEQFusion] | None = None,
        head_hidden: Sequence[int] = (),
        head_dropout: float = 0.0,
    ) -> None:
        super().__init__(encoders, num_outputs, head_hidden=head_hidden, head_dropout=head_dropout)
        check_choices("fusion", {"fusion_point": (fusion_point, FUSION_POINTS)})
        if set(self.modalities) != set(MODALITIES):
            raise ConfigError(
                f"Mutan fuses the modalities {list(MODALITIES)}, the backbone built {self.modalities}; use "
                "dataset=vqa with backbone=vqa."
            )
        if fusion_point == "mutan" and deq_args is not None:
            raise ConfigError(
                "fusion.deq_args is set but fusion.fusion_point=mutan ignores it: use fusion=mutan_deq "
                "(fusion_point deq) or drop deq_args."
            )
        question_enc = self.encoders["question"]
        vocab_size = vocab_size if vocab_size is not None else getattr(question_enc, "vocab_size", None)
        if vocab_size is None or int(vocab_size) < 2:
            raise ConfigError(
                f"Mutan needs the question vocabulary size (got {vocab_size}): set fusion.vocab_size or use "
                "a question encoder with `vocab_size` (backbone=vqa fills it from the data)."
            )
        if glimpses < 1 or question_dim < 1 or embed_dim < 1:
            raise ConfigError(
                f"fusion.glimpses, question_dim and embed_dim must be >= 1, got {glimpses}, {question_dim}, "
                f"{embed_dim}."
            )
        self.fusion_point, self.glimpses = fusion_point, int(glimpses)
        dim_v = self.embed_dims["image"]

        self.embed = nn.Embedding(int(vocab_size), embed_dim, padding_idx=0)
        if glove_file is not None:
            load_glove(
                self.embed, glove_file, vocab if vocab is not None else getattr(question_enc, "vocab", None)
            )
        self.question_dropout = float(question_dropout)
        self.gru = nn.GRU(embed_dim, question_dim, batch_first=True)

        self.attention = MutanAttention(
            dim_v,
            question_dim,
            att_dim_hv,
            att_dim_hq,
            att_dim_mm,
            att_rank,
            glimpses,
            att_dropout_v,
            att_dropout_q,
            att_dropout_mm,
        )
        if fusion_point == "deq":
            width = int(deq_width) if deq_width is not None else int(dim_hv)
            v_width, q_width = width, width
        else:
            v_width, q_width = int(dim_hv), int(dim_hq)
        if v_width % self.glimpses:
            key = "deq_width" if fusion_point == "deq" else "dim_hv"
            raise ConfigError(
                f"fusion.{key}={v_width} must be divisible by fusion.glimpses={glimpses}: each glimpse is "
                "projected to an equal share of it."
            )
        self.glimpse_proj = nn.ModuleList(
            nn.Linear(dim_v, v_width // self.glimpses) for _ in range(self.glimpses)
        )
        self.question_proj = nn.Linear(question_dim, q_width)
        self.drop_v, self.drop_q = nn.Dropout(dropout_v), nn.Dropout(dropout_q)
        self.drop_classif = nn.Dropout(classif_dropout)

        if fusion_point == "deq":
            deq_encoders = nn.ModuleDict({m: IdentityEncoder(v_width) for m in MODALITIES})
            build = deq_args if callable(deq_args) else lambda **kw: DEQFusion(**kw, **dict(deq_args or {}))
            self.deq = build(encoders=deq_encoders, num_outputs=num_outputs)
            if not isinstance(self.deq, DEQFusion):
                raise ConfigError(f"fusion.deq_args must build a DEQFusion, got {type(self.deq).__name__}.")
            self.deq.head = nn.Identity()  # Mutan's classifier (self.head) reads z_fuse*
            self.fused_dim = v_width
        else:
            self.fusion = TuckerFusion(v_width, q_width, dim_mm, rank)
            self.fused_dim = int(dim_mm)
        self.build_head()

    def question_vector(self, ids: torch.Tensor) -> torch.Tensor:
        """GRU state at the last real token of right-padded ids (B, L) -> (B, question_dim)."""
        if ids.dim() != 2 or ids.is_floating_point():
            raise ConfigError(
                f"Mutan's question input must be word ids (batch, length), got {tuple(ids.shape)} "
                f"{ids.dtype}: use the pass-through question encoder of backbone=vqa."
            )
        e = self.embed(ids)
        if self.training and self.question_dropout > 0:  # one mask per question, shared by its words
            keep = 1 - self.question_dropout
            e = e * torch.bernoulli(e.new_full((e.shape[0], 1, e.shape[2]), keep)) / keep
        lengths = (ids != 0).sum(1).clamp_min(1)
        packed = pack_padded_sequence(e, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, h = self.gru(packed)
        return h[-1]

    def final_inputs(self, embeddings: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The two inputs of the final fusion: x_v (B, G * dim_hv / G) and x_q (B, dim_hq)."""
        v = embeddings["image"]
        if v.dim() != 3:
            raise ConfigError(
                f"Mutan's image input must be region features (batch, regions, dim), got {tuple(v.shape)}."
            )
        q = self.question_vector(embeddings["question"])
        _, attended = self.attention(v, q, v.abs().sum(-1) != 0)
        x_v = torch.cat(
            [torch.tanh(proj(self.drop_v(attended[:, g]))) for g, proj in enumerate(self.glimpse_proj)],
            dim=-1,
        )
        return x_v, torch.tanh(self.question_proj(self.drop_q(q)))

    def combine(self, embeddings: Mapping[str, torch.Tensor]):
        x_v, x_q = self.final_inputs(embeddings)
        if self.fusion_point == "deq":
            z, aux, info = self.deq.combine({"image": x_v, "question": x_q})
        else:
            z, aux, info = self.fusion(x_v, x_q), None, {}
        return self.drop_classif(z), aux, info

    def deq_inputs(
        self, inputs: Mapping[str, torch.Tensor]
    ) -> tuple[DEQFusion | None, dict[str, torch.Tensor]]:
        """The DEQ layer (None with ``fusion_point=mutan``) and what it fuses, the two inputs of the final
        fusion: what `fusionbench.fusion.deq.callbacks.deq_diagnostics` traces."""
        x_v, x_q = self.final_inputs(self.encode(inputs))
        return (self.deq if self.fusion_point == "deq" else None), {"image": x_v, "question": x_q}


def load_glove(embed: nn.Embedding, path: str | Path, vocab: Sequence[str] | None) -> None:
    """Copy the GloVe vectors of the vocabulary's words into ``embed`` (padding id 0 stays zero)."""
    path = Path(path)
    if vocab is None:
        raise ConfigError(
            "fusion.glove_file needs the vocabulary's words: set fusion.vocab or use a question encoder with "
            "a `vocab` attribute."
        )
    if not path.is_file():
        raise ConfigError(
            f"fusion.glove_file={path} does not exist: point it at a GloVe .txt file or set it null."
        )
    if len(vocab) != embed.num_embeddings:
        raise ConfigError(
            f"fusion.vocab has {len(vocab)} words but the embedding has {embed.num_embeddings} rows."
        )
    index = {w: i for i, w in enumerate(vocab) if i != 0}
    found = 0
    with torch.no_grad(), path.open(encoding="utf8") as f:
        for line in f:
            word, *values = line.rstrip().split(" ")
            i = index.get(word)
            if i is None:
                continue
            if len(values) != embed.embedding_dim:
                raise ConfigError(
                    f"{path} has {len(values)}-d vectors but fusion.embed_dim={embed.embedding_dim}; make "
                    "them equal."
                )
            embed.weight[i] = torch.tensor([float(x) for x in values])
            found += 1
    log.info("GloVe: %d of %d words initialised from %s", found, len(index), path)
