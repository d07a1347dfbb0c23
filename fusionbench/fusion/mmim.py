"""MultiModal InfoMax (MMIM; Han, Chen & Poria 2021, "Improving Multimodal Fusion with Hierarchical Mutual
Information Maximization for Multimodal Sentiment Analysis"; Pro-Fusion's "MIM" rows), after the public code
declare-lab/Multimodal-Infomax (``src/model.py``, ``src/modules/encoders.py``, ``src/solver.py``,
``src/config.py``).

Model (paper §3; the terms are named as in the paper, its equation numbers could not be checked here):

    h_t = BERT(text)[CLS] (768)      h_a = RNN_a(audio) (16)      h_v = RNN_v(vision) (16)
        RNN = packed LSTM(d_in -> 16) over the real steps, last hidden state -> Linear(16, 16)
    Z    = tanh(W_2 tanh(W_1 dropout_0.1([h_t; h_a; h_v])))     fusion SubNet, d_prjh = 128
    y^   = W_3 Z                                               the head (``head``)

    inter-modality MI, Barber-Agakov bound   I(X;Y) >= E_p(x,y)[log q(y|x)] + H(Y)   (I_BA)
        q(y|x) = N(y; mu(x), diag sigma^2(x)), mu and log sigma^2 each MLP(x -> y -> y) with ReLU
        lld    = mean_i sum_d -(y_id - mu_d(x_i))^2 / (2 sigma_d^2(x_i))      (public code, ``lld=code``)
                 the log-variance term -1/2 log sigma^2 - 1/2 log 2 pi is omitted there;
                 ``lld=gaussian`` uses the full Gaussian log-likelihood instead
        H(Y)   ~ 1/4 (log det Sigma_+ + log det Sigma_-)    Gaussians of tanh(P y) over the samples with
                 positive / negative labels in this batch and the previous one (memory of one batch)
        pairs (x, y) = (text, vision), (text, audio);  L_BA = sum over pairs of (lld + H)

    fusion-level MI, CPC (InfoNCE) from Z back to every modality m in {t, a, v}:
        h^_m = G_m(Z) (Linear(128, d_m)), both unit-normalised;  s_ij = <h_m,i, h^_m,j>
        nce_m = -mean_i log softmax_j(s_ij)[i]  (softmax over the batch);  nce = nce_t + nce_a + nce_v

    training objective (solver.py, stage 1):  L = L_task + alpha * nce - beta * L_BA,  alpha = beta = 0.1;
    the estimators' own objective (stage 0):  maximise lld w.r.t. the q(y|x) parameters only.
    This is the README's run, ``python main.py --dataset mosi --contrast`` (without ``--contrast`` only the
    entropy term is used); ``--add_va`` (a vision -> audio pair) is off by default and not built here.

One optimiser instead of MMIM's two stages (departure). The public code alternates, per epoch, a pass that
maximises lld with an optimiser holding only the estimators (``mmilb``), and a pass that trains everything
else on ``L`` (the estimators' gradients from ``L`` are computed but never applied). Here both happen in one
backward pass: ``aux_loss = alpha * nce - beta * lld(x, y; theta_est frozen) - lld(x.detach(), y.detach();
theta_est)``, the first ``lld`` through `torch.func.functional_call` with detached estimator parameters, so
the estimators receive only the gradient of their own objective and the rest of the model only that of
``L``. The entropy term needs the labels and is added by `target_loss` (``-beta * H``).

Other departures from the public code, each with its reason:
- Data: MMIM feeds its RNNs the per-word rows of unaligned/aligned CMU-SDK features with their own lengths;
  the fusionbench MOSI/MOSEI pickles (``dataset=mosi_mag``) are word-aligned to BERT's word pieces (a word's
  row repeated per piece, zero rows at [CLS]/[SEP]/padding). The RNNs run over the real pieces: the text
  attention mask gives the lengths, and with ``drop_special`` (default) the [CLS] and [SEP] rows are left
  out (lengths = mask sum - 2, at least 1, as MMIM sets empty lengths to 1). This needs right padding (BERT).
- Entropy projection ``tanh(P y)``: MMIM puts P with the estimators, but P only gets gradients in stage 1,
  where the estimators' optimiser does not step, so it is never trained by its loss (in torch 1.7, which
  the code pins, zeroed gradients still let Adam's weight decay shrink it); here it is a fixed random
  projection (``requires_grad=False``). The memory is reset when the model is put into evaluation mode
  (Lightning does so for every validation, so once per epoch, as MMIM's per-epoch ``train()``) and H is
  added from the third training batch after a reset, as MMIM's ``i_batch > mem_size``. A label group with
  fewer samples than P's width + 1 (a singular covariance, where MMIM would produce -inf) contributes no
  entropy.
- MMIM's stage 0 on MOSEI uses only the first half of the training batches; here the estimators learn on
  every batch.
- ``RNNEncoder`` with several layers takes the top layer's last state (MMIM's ``squeeze`` is only right for
  one layer, its default).
- Parameters with two or more dimensions outside BERT start Xavier-normal, as solver.py (``xavier_init``).

Pro-Fusion (``fusion=profusion fusion.base=mmim``): the context joins BERT (`PretrainedTextEncoder`) and each
RNN (concatenated to every step's input, or added to the RNN's output projection with ``join_layer: 1``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence

from fusionbench.encoders.context import ContextEncoder
from fusionbench.encoders.pretrained import split_tokens
from fusionbench.errors import ConfigError
from fusionbench.fusion.base import EncoderFusion, FusionOutput, FusionStep

MODALITIES = ("audio", "text", "vision")
PAIRS = {"tv": ("text", "vision"), "ta": ("text", "audio")}  # MMILB (x, y): q(y | x)
LLD_FORMS = ("code", "gaussian")


def activation(name: str, what: str) -> type[nn.Module]:
    act = getattr(nn, str(name), None)
    if not (isinstance(act, type) and issubclass(act, nn.Module)):
        raise ConfigError(f"{what}={name!r} is not a torch.nn activation (e.g. ReLU, Tanh).")
    return act


def xavier_(module: nn.Module) -> None:
    """Xavier-normal for every trainable parameter with >= 2 dimensions (MMIM's solver.py)."""
    for p in module.parameters():
        if p.requires_grad and p.dim() > 1:
            nn.init.xavier_normal_(p)


class RNNEncoder(ContextEncoder):
    """MMIM's ``RNNEncoder``: an LSTM over the real steps of a (B, T, d) sequence (packed by ``lengths``;
    all T steps without them), its top layer's last hidden state (both directions if bidirectional) ->
    dropout -> Linear(hidden, out_size).

    Args:
        in_features: values per step (MOSI audio 74, vision 47; MOSEI vision 35).
        hidden: LSTM width (MMIM ``d_ah`` / ``d_vh`` 16).
        out_size: output width (``d_aout`` / ``d_vout`` 16).
        layers: stacked LSTM layers (``n_layer`` 1).
        dropout: between LSTM layers and on the last state (MMIM: ``dropout_a``/``dropout_v`` 0.1 only when
            ``n_layer > 1``, else 0).
        bidirectional: MMIM's ``--bidirectional`` (off).
        xavier_init: Xavier-normal weights as MMIM's solver.

    Pro-Fusion context: join 0 concatenates c to every step's input (the first layer's input map becomes
    ``[W_ih, B]``, run on the packed steps by the same kernel nn.LSTM uses); join 1 adds ``B c`` to the
    output projection.
    """

    width_key = "out_size"
    takes_lengths = True  # MMIMFusion passes the lengths from the text mask

    def __init__(
        self,
        in_features: int,
        hidden: int = 16,
        out_size: int = 16,
        layers: int = 1,
        dropout: float = 0.0,
        bidirectional: bool = False,
        xavier_init: bool = True,
    ) -> None:
        super().__init__()
        self.in_features, self.hidden, self.out_size = int(in_features), int(hidden), int(out_size)
        self.directions = 2 if bidirectional else 1
        self.rnn = nn.LSTM(
            self.in_features,
            self.hidden,
            num_layers=int(layers),
            dropout=float(dropout) if layers > 1 else 0.0,
            bidirectional=bool(bidirectional),
            batch_first=True,
        )
        self.dropout = nn.Dropout(float(dropout))
        self.linear = nn.Linear(self.directions * self.hidden, self.out_size)
        self.output_dim = self.out_size
        if xavier_init:
            xavier_(self)

    def join_widths(self) -> list[int]:
        return [4 * self.hidden * self.directions, self.out_size]

    def _last_states(
        self, x: torch.Tensor, lengths: torch.Tensor, context: torch.Tensor | None
    ) -> torch.Tensor:
        """h_n (layers * directions, B, hidden) of the packed sequence, in batch order."""
        joint = self._modules.get("context_join")
        if context is not None and joint is not None and joint.layer == 0:
            b, t = x.shape[:2]
            x = torch.cat([x, context.unsqueeze(1).expand(b, t, context.shape[-1]).to(x.dtype)], dim=-1)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        if x.shape[-1] == self.in_features:
            return self.rnn(packed)[1][0]
        # [x_t ; c] through the first layer's widened input map [W_ih, B] (one block of columns per direction)
        lstm = self.rnn
        weights = list(lstm._flat_weights)
        stride = 4 if lstm.bias else 2  # w_ih, w_hh (, b_ih, b_hh) per layer and direction
        for d, extra in enumerate(joint.proj.weight.chunk(self.directions, dim=0)):
            weights[d * stride] = torch.cat([weights[d * stride], extra], dim=1)
        zeros = x.new_zeros(lstm.num_layers * self.directions, x.shape[0], lstm.hidden_size)
        _, h, _ = torch._VF.lstm(
            packed.data,
            packed.batch_sizes,
            (zeros, zeros),
            weights,
            lstm.bias,
            lstm.num_layers,
            float(lstm.dropout),
            self.training,
            lstm.bidirectional,
        )
        return h.index_select(1, packed.unsorted_indices)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"RNNEncoder expects (batch, time, {self.in_features}) inputs, got {tuple(x.shape)}"
            )
        if lengths is None:
            lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long)
        lengths = lengths.long().clamp(1, x.shape[1])
        h = self._last_states(x, lengths, context)
        last = torch.cat([h[-2], h[-1]], dim=-1) if self.directions == 2 else h[-1]
        return self.join(1, self.linear(self.dropout(last)), context)


class MMILB(nn.Module):
    """Gaussian q(y | x) of the Barber-Agakov bound: ``mu`` and ``logvar`` MLPs (x -> y -> y, ReLU), and the
    fixed entropy projection ``tanh(P y)`` (y -> y // 4). ``forward(x, y)`` is the batch-mean log-likelihood
    (module docstring: ``code`` omits the log-variance and constant terms, as the public code)."""

    def __init__(self, x_size: int, y_size: int, mid_activation: str = "ReLU", form: str = "code") -> None:
        super().__init__()
        if form not in LLD_FORMS:
            raise ConfigError(f"fusion.lld must be one of {LLD_FORMS}, got {form!r}.")
        act = activation(mid_activation, "fusion.mmilb_activation")
        self.form = form
        self.mu = nn.Sequential(nn.Linear(x_size, y_size), act(), nn.Linear(y_size, y_size))
        self.logvar = nn.Sequential(nn.Linear(x_size, y_size), act(), nn.Linear(y_size, y_size))
        self.entropy_prj = nn.Sequential(nn.Linear(y_size, max(y_size // 4, 1)), nn.Tanh())
        self.entropy_prj.requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mu, logvar = self.mu(x), self.logvar(x)
        log_q = -((mu - y) ** 2) / 2.0 / torch.exp(logvar)
        if self.form == "gaussian":
            log_q = log_q - 0.5 * logvar - 0.5 * math.log(2 * math.pi)
        return log_q.sum(-1).mean()


class CPC(nn.Module):
    """InfoNCE from the fused vector to one modality: ``nce = -mean_i log softmax_j(<x^_i, G(z)^_j>)[i]`` with
    unit-normalised vectors; G = Linear(z, x) (``layers`` > 1: Linear, activation, then Linear(x, x)s)."""

    def __init__(self, x_size: int, z_size: int, layers: int = 1, act: str = "Tanh") -> None:
        super().__init__()
        if layers < 1:
            raise ConfigError(f"fusion.cpc_layers must be >= 1, got {layers}.")
        if layers == 1:
            self.net: nn.Module = nn.Linear(z_size, x_size)
        else:
            mods = [nn.Linear(z_size, x_size), activation(act, "fusion.cpc_activation")()]
            mods += [nn.Linear(x_size, x_size) for _ in range(layers - 1)]
            self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        pred = F.normalize(self.net(z), dim=1)
        x = F.normalize(x, dim=1)
        scores = x @ pred.t()  # (B, B): row i scores x_i against every prediction
        return F.cross_entropy(scores, torch.arange(len(x), device=x.device))


class SubNet(nn.Module):
    """MMIM's fusion projection up to the fused vector: ``tanh(W_2 tanh(W_1 dropout(x)))``."""

    def __init__(self, in_size: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.drop = nn.Dropout(float(dropout))
        self.linear_1 = nn.Linear(in_size, hidden)
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear_2(torch.tanh(self.linear_1(self.drop(x)))))


def gaussian_entropy(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor | None:
    """MMIM's ``1/4 (log det Sigma_+ + log det Sigma_-)`` (biased covariances); None when a group has too
    few samples for a non-singular covariance."""
    terms = []
    for s in (pos, neg):
        if len(s) <= s.shape[1]:
            return None
        c = s - s.mean(0)
        sign, logdet = torch.linalg.slogdet(c.t() @ c / len(s))
        if sign <= 0:
            return None
        terms.append(logdet)
    return 0.25 * (terms[0] + terms[1])


class MMIMFusion(EncoderFusion):
    """MMIM on text (pooled [CLS] of a `PretrainedTextEncoder`), audio and vision (`RNNEncoder`s).

    Args:
        encoders: ``audio``, ``text``, ``vision`` (exactly these), each giving one vector per sample.
        num_outputs: 1 for sentiment regression.
        hidden: fusion width ``d_prjh`` (128).
        dropout: on the concatenated input of the fusion (``dropout_prj`` 0.1).
        alpha: weight of the CPC loss (0.1).
        beta: weight of the Barber-Agakov bound (lld and entropy; 0.1).
        cpc_layers, cpc_activation: CPC's G (1 layer; Tanh between layers).
        mmilb_activation: activation inside the q(y|x) MLPs (ReLU).
        lld: ``code`` (the public code's likelihood without log-variance term) or ``gaussian``.
        entropy: add MMIM's memory-based entropy estimate (through `target_loss`).
        drop_special: leave the [CLS]/[SEP] rows out of the RNNs' steps (module docstring).
        xavier_init: Xavier-normal weights as MMIM's solver.

    Submodules (parameter names for optimizer groups): ``encoders.text.model`` (BERT), ``encoders.audio`` /
    ``encoders.vision`` (RNNs), ``mmilb.tv`` / ``mmilb.ta`` (the estimators, trained only on their own
    objective), ``cpc.{text,audio,vision}``, ``subnet``, ``head``.
    """

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        num_outputs: int,
        hidden: int = 128,
        dropout: float = 0.1,
        alpha: float = 0.1,
        beta: float = 0.1,
        cpc_layers: int = 1,
        cpc_activation: str = "Tanh",
        mmilb_activation: str = "ReLU",
        lld: str = "code",
        entropy: bool = True,
        drop_special: bool = True,
        xavier_init: bool = True,
    ) -> None:
        super().__init__(encoders, num_outputs)
        if self.modalities != list(MODALITIES):
            raise ConfigError(
                f"MMIM fuses exactly audio, text and vision; the backbone built encoders for "
                f"{self.modalities}. "
                "Use `dataset=mosi_mag`/`mosei_mag` with `backbone=mosi_mmim`/`mosei_mmim` and all three "
                "modalities."
            )
        if getattr(self.encoders["text"], "output", "pooled") != "pooled":
            raise ConfigError("MMIM reads one text vector ([CLS]): set `backbone.text.output=pooled`.")
        text = self.encoders["text"]
        pooler = getattr(getattr(text, "model", None), "pooler", None)
        if pooler is not None and getattr(text, "pool", "cls") != "pooler":
            # MMIM reads the last layer's [CLS]: BERT's pooler never gets a gradient (nor is it trained in
            # MMIM), and a parameter without gradient stalls DDP's reduction
            pooler.requires_grad_(False)
        dims = self.embed_dims
        self.alpha, self.beta = float(alpha), float(beta)
        self.use_entropy, self.drop_special = bool(entropy), bool(drop_special)
        self.mmilb = nn.ModuleDict(
            {p: MMILB(dims[x], dims[y], mmilb_activation, lld) for p, (x, y) in PAIRS.items()}
        )
        self.cpc = nn.ModuleDict(
            {
                m: CPC(dims[m], int(hidden), int(cpc_layers), cpc_activation)
                for m in ("text", "audio", "vision")
            }
        )
        self.subnet = SubNet(sum(dims.values()), int(hidden), dropout)
        self.fused_dim = int(hidden)
        self.build_head()
        if xavier_init:
            for module in (self.mmilb, self.cpc, self.subnet, self.head):
                xavier_(module)
            for est in self.mmilb.values():  # the fixed entropy projection starts Xavier too
                nn.init.xavier_normal_(est.entropy_prj[0].weight)
        self._memory: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._batches = 0  # training batches since the last reset of the memory

    # -- entropy memory ------------------------------------------------------------------------
    def train(self, mode: bool = True) -> MMIMFusion:
        # entering evaluation ends a training phase (Lightning's validation, once per epoch; it restores the
        # training flags without calling train()): the next training batches start MMIM's fresh memory
        if mode != self.training:
            self._memory, self._batches = {}, 0
        return super().train(mode)

    # -- forward -------------------------------------------------------------------------------
    def lengths(self, text: torch.Tensor) -> torch.Tensor | None:
        """Real steps of the word-aligned audio/vision rows, from the text attention mask."""
        if text.dim() != 3 or text.shape[1] != 2 or text.is_floating_point():
            return None  # not the token modality: the RNNs run over every step
        mask = split_tokens(text)[1]
        n = mask.sum(1)
        if not torch.equal(mask, (torch.arange(mask.shape[1], device=mask.device) < n.unsqueeze(1)).long()):
            raise ConfigError(
                "MMIM's RNN encoders read the first `mask.sum()` steps, but the text attention mask is not "
                "right-padded (XLNet's left padding?). Use a BERT tokenizer (`backbone.text.pretrained`)."
            )
        return (n - 2 if self.drop_special else n).clamp_min(1)

    def encode(
        self, inputs: Mapping[str, torch.Tensor], context: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        self.check_inputs(inputs)
        context = context or {}
        lengths = self.lengths(inputs["text"])
        out = {}
        for m in self.modalities:
            enc, x = self.encoders[m], inputs[m]
            if m != "text" and getattr(enc, "takes_lengths", False):
                if lengths is not None and self.drop_special:
                    x = x[:, 1:]  # the [CLS] row; [SEP] falls beyond the shortened length
                out[m] = enc(x, context.get(m), lengths=lengths)
            else:
                out[m] = enc(x, context.get(m))
        return out

    def lld(self, embeddings: Mapping[str, torch.Tensor], frozen: bool) -> torch.Tensor:
        """Sum over the pairs of the estimators' log-likelihood; ``frozen``: estimator parameters detached
        (gradients reach the encoders only), else inputs detached (gradients reach the estimators only)."""
        total = 0.0
        for p, (xm, ym) in PAIRS.items():
            est = self.mmilb[p]
            x, y = embeddings[xm], embeddings[ym]
            if frozen:
                params = {n: t.detach() for n, t in est.named_parameters()}
                total = total + functional_call(est, params, (x, y))
            else:
                total = total + est(x.detach(), y.detach())
        return total

    def combine(
        self, embeddings: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        bad = {m: tuple(h.shape) for m, h in embeddings.items() if h.dim() != 2}
        if bad:
            raise ConfigError(f"MMIM needs one vector per sample from every encoder; got shapes {bad}.")
        fused = self.subnet(torch.cat([embeddings[m] for m in ("text", "audio", "vision")], dim=1))
        nce = sum(self.cpc[m](embeddings[m], fused) for m in ("text", "audio", "vision"))
        lld = self.lld(embeddings, frozen=True)
        info = {"mmim/lld": lld.detach(), "mmim/nce": nce.detach()}
        if not self.training:
            return fused, None, info
        estimator_loss = -self.lld(embeddings, frozen=False)  # stage 0: maximise lld w.r.t. the estimators
        return fused, self.alpha * nce - self.beta * lld + estimator_loss, info

    def step(
        self, inputs: Mapping[str, torch.Tensor], context: Mapping[str, torch.Tensor] | None = None
    ) -> FusionStep:
        embeddings = self.encode(inputs, context)
        fused, aux_loss, info = self.combine(embeddings)
        extras = None
        if self.training and self.use_entropy:  # tanh(P y) per pair, for the entropy in `target_loss`
            extras = {p: self.mmilb[p].entropy_prj(embeddings[ym]) for p, (_, ym) in PAIRS.items()}
        return FusionStep(fused, aux_loss, info, embeddings, extras)

    def target_loss(self, output: FusionOutput, target: torch.Tensor) -> torch.Tensor:
        """``-beta * H``, MMIM's entropy term (needs the labels' signs); 0 outside training."""
        zero = output.logits.new_zeros(())
        if not self.training or not self.use_entropy or not output.extras:
            return zero
        y = target.reshape(-1)
        total, memory = zero, {}
        for p, z in output.extras.items():
            pos, neg = z[y > 0], z[y < 0]
            memory[p] = (pos.detach(), neg.detach())
            if p in self._memory and self._batches > 1:  # MMIM: i_batch > mem_size (1)
                h = gaussian_entropy(
                    torch.cat([self._memory[p][0], pos]), torch.cat([self._memory[p][1], neg])
                )
                if h is not None:
                    total = total + h
        self._memory = memory
        self._batches += 1
        return -self.beta * total
