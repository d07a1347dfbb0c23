"""Multimodal Factorization Model (MFM; Tsai et al. 2019b, "Learning Factorized Multimodal
Representations") as MultiBench's AV-MNIST example (``examples/multimedia/avmnist_MFM.py``):

    z_m = L_m(G_m(x_m))                        LeNetEncoder(-> 200): LeNet then Linear(d_m, 200)
    f   = J([z_1; ...; z_N])                   joint (multimodal discriminative) factor, MLP(400, 200, 100)
    y   = head(f)                              MLP(100, 40, 10)
    a_m = I_m(z_m)                             modality-specific generative factor, MLP(200, 100, 100)
    x̂_m = D_m([a_m; f])                        DeLeNet decoder (transposed convolutions), centre-cropped
    loss = ce_weight * CE(y) + recon_weight * sum_m R(x̂_m, x_m)          (MultiBench: 2 * CE + 1 * R)

How it maps onto the task: the task adds CE with weight 1 and this model's ``aux_loss``, which is
``recon_weight * sum_m R_m / ce_weight``; the total is MultiBench's objective divided by ``ce_weight``
(for RMSprop, MultiBench's optimizer here, a constant loss scale hardly matters; with SGD, multiply
the learning rate by ``ce_weight`` to match). MultiBench trains the model deterministically
(``twooutput=False``: no variational sampling, no KL term), and so does this one.

Decoder (MultiBench ``DeLeNet``): Linear(200, c * 2^L) -> 1x1 map, L blocks of ConvTranspose(4, stride
2, pad 1) halving the channels + BN + ReLU, then ConvTranspose(c -> C, 8, stride 4, pad 1): output
side 4 * 2^L + 2, i.e. 34 for the image (L = 3) and 130 for the audio (L = 5), centre-cropped to
28 / 112 as ``sigmloss1dcentercrop``. Here L is the smallest depth whose output covers the input side,
which gives MultiBench's 3 and 5 on AV-MNIST. Vector inputs (other datasets) get an MLP decoder.

Reconstruction loss ``recon_loss``:
- ``bce`` (default): binary cross-entropy of the decoder logits against the inputs (in [0, 1] on
  AV-MNIST), averaged over values and batch -- what "sigmoid reconstruction" means.
- ``multibench``: MultiBench's ``sigmloss1dcentercrop`` literally. It swaps its arguments when the
  reconstruction is the larger tensor, so it computes BCE with *prediction* sigmoid(input) and *target*
  sigmoid(reconstruction); as that is linear in the target, it only pushes every reconstructed logit
  towards +inf where the input is positive (a degenerate objective kept for comparison).
- ``mse``: mean squared error between sigmoid(logits) and the inputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fusionbench.errors import ConfigError
from fusionbench.fusion.base import EncoderFusion, FusionStep, mlp_head
from fusionbench.fusion.refnet import flat_input, resolve_input_shapes

RECON_LOSSES = ("bce", "multibench", "mse")


def delenet_depth(side: int) -> int:
    """Smallest L >= 1 with DeLeNet output side 4 * 2^L + 2 >= side."""
    depth = 1
    while 4 * 2**depth + 2 < side:
        depth += 1
    return depth


class DeLeNet(nn.Module):
    """MultiBench's transposed-convolution decoder, cropped to ``shape`` = (C, H, W)."""

    def __init__(self, latent: int, shape: Sequence[int], channels: int = 6) -> None:
        super().__init__()
        out_channels, height, width = (int(s) for s in shape)
        depth = delenet_depth(max(height, width))
        self.shape = (out_channels, height, width)
        self.linear = nn.Linear(latent, channels * 2**depth)
        self.deconvs = nn.ModuleList(
            [
                nn.ConvTranspose2d(
                    channels * 2 ** (depth - i),
                    channels * 2 ** (depth - i - 1),
                    4,
                    stride=2,
                    padding=1,
                    bias=False,
                )
                for i in range(depth)
            ]
            + [nn.ConvTranspose2d(channels, out_channels, 8, stride=4, padding=1, bias=False)]
        )
        self.norms = nn.ModuleList([nn.BatchNorm2d(channels * 2 ** (depth - i - 1)) for i in range(depth)])
        self.out_side = 4 * 2**depth + 2

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.linear(z)[:, :, None, None]
        for k, deconv in enumerate(self.deconvs):
            h = deconv(h)
            if k < len(self.norms):
                h = F.relu(self.norms[k](h))
        _, height, width = self.shape
        top, left = (h.shape[2] - height) // 2, (h.shape[3] - width) // 2
        return h[:, :, top : top + height, left : left + width]


class MLPDecoder(nn.Module):
    """``Linear -> ReLU -> Linear`` to the flattened input, reshaped to ``shape``."""

    def __init__(self, latent: int, shape: Sequence[int], hidden: int) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.net = mlp_head(latent, math.prod(self.shape), [hidden])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(z.shape[0], *self.shape)


def reconstruction_loss(logits: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean over values and batch of the chosen reconstruction loss (see the module docstring)."""
    logits, x = logits.flatten(1), x.flatten(1).to(logits.dtype)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, x)
    if kind == "mse":
        return F.mse_loss(torch.sigmoid(logits), x)
    # MultiBench: prediction sigmoid(x), target sigmoid(logits): -y log s(x) - (1 - y) log s(-x)
    y = torch.sigmoid(logits)
    return (-(y * F.logsigmoid(x)) - (1 - y) * F.logsigmoid(-x)).mean()


class MFMFusion(EncoderFusion):
    """Args:
    encoders: one encoder per modality (AV-MNIST: LeNet 48 / 192; each gets a Linear to ``latent_dim``).
    num_outputs: classes.
    latent_dim: width of the unimodal codes z_m (200).
    joint_hidden: hidden width of the joint MLP J (200).
    joint_dim: width of the joint factor f, the fused vector (100).
    private_hidden: hidden width of the modality-specific MLPs I_m (100).
    private_dim: width of a_m (100).
    decoder_channels: channels of the last DeLeNet block (6, as the encoders).
    decoder_hidden: hidden width of the MLP decoder used for vector inputs.
    ce_weight: MultiBench's weight of the classification loss (2); divides the reconstruction weight.
    recon_weight: weight of each modality's reconstruction loss (1).
    recon_loss: ``bce``, ``multibench`` or ``mse`` (module docstring).
    input_shapes: per-sample shape of each modality's input; None: the encoders' ``input_dim``
        (LeNet has none: AV-MNIST sets ``{image: [1, 28, 28], audio: [1, 112, 112]}``).
    head_hidden: hidden widths of the prediction head ([40]).
    head_dropout: dropout inside the head.
    """

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        num_outputs: int,
        latent_dim: int = 200,
        joint_hidden: int = 200,
        joint_dim: int = 100,
        private_hidden: int = 100,
        private_dim: int = 100,
        decoder_channels: int = 6,
        decoder_hidden: int = 200,
        ce_weight: float = 2.0,
        recon_weight: float = 1.0,
        recon_loss: str = "bce",
        input_shapes: Mapping[str, int | Sequence[int]] | None = None,
        head_hidden: Sequence[int] = (40,),
        head_dropout: float = 0.0,
    ) -> None:
        super().__init__(encoders, num_outputs, head_hidden=head_hidden, head_dropout=head_dropout)
        if recon_loss not in RECON_LOSSES:
            raise ConfigError(f"fusion.recon_loss must be one of {RECON_LOSSES}, got {recon_loss!r}.")
        if ce_weight <= 0 or recon_weight < 0:
            raise ConfigError(
                f"fusion.ce_weight must be > 0 and fusion.recon_weight >= 0, got {ce_weight} and "
                f"{recon_weight}."
            )
        self.recon_loss, self.ce_weight, self.recon_weight = recon_loss, float(ce_weight), float(recon_weight)
        self.input_shapes = resolve_input_shapes(self.encoders, self.modalities, input_shapes, "MFM")
        self.to_latent = nn.ModuleDict({m: nn.Linear(d, latent_dim) for m, d in self.embed_dims.items()})
        self.joint = mlp_head(latent_dim * len(self.modalities), joint_dim, [joint_hidden])
        self.private = nn.ModuleDict(
            {m: mlp_head(latent_dim, private_dim, [private_hidden]) for m in self.modalities}
        )
        decode_in = private_dim + joint_dim
        self.decoders = nn.ModuleDict(
            {
                m: DeLeNet(decode_in, s, decoder_channels)
                if len(s) == 3
                else MLPDecoder(decode_in, s, decoder_hidden)
                for m, s in self.input_shapes.items()
            }
        )
        self.fused_dim = int(joint_dim)
        self.build_head()

    def latents(self, embeddings: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: self.to_latent[m](embeddings[m]) for m in self.modalities}

    def fuse(self, embeddings: Mapping[str, torch.Tensor]) -> torch.Tensor:
        z = self.latents(embeddings)
        return self.joint(torch.cat([z[m] for m in self.modalities], dim=-1))

    def reconstruct(
        self,
        embeddings: Mapping[str, torch.Tensor],
        fused: torch.Tensor,
        latents: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Decoder logits x̂_m = D_m([I_m(z_m); f]), shaped like the inputs."""
        z = self.latents(embeddings) if latents is None else latents
        return {
            m: self.decoders[m](torch.cat([self.private[m](z[m]), fused], dim=-1)) for m in self.modalities
        }

    def step(
        self, inputs: Mapping[str, torch.Tensor], context: Mapping[str, torch.Tensor] | None = None
    ) -> FusionStep:
        embeddings = self.encode(inputs, context)
        z = self.latents(embeddings)
        fused = self.joint(torch.cat([z[m] for m in self.modalities], dim=-1))
        recon = self.reconstruct(embeddings, fused, z)
        terms = {
            m: reconstruction_loss(
                recon[m], flat_input(inputs[m], math.prod(self.input_shapes[m]), m, "MFM"), self.recon_loss
            )
            for m in self.modalities
        }
        aux = self.recon_weight * torch.stack(list(terms.values())).sum() / self.ce_weight
        return FusionStep(fused, aux, {f"mfm/recon_{m}": t.detach() for m, t in terms.items()}, embeddings)
