"""ESANet (Seichter et al., "Efficient RGB-D Semantic Segmentation for Indoor Scene Analysis", ICRA 2021):
two ResNet encoders, depth fused into the RGB stream by squeeze-and-excitation addition after the stem and
after each of the four stages, a pyramid pooling context module and a decoder with learned upsampling.
DynMM's fusion-level model (`fusionbench.fusion.dynmm.fusion_level`) is this network with a gate.

    f_0 = SE_rgb(stem_rgb(x)) + SE_d(stem_d(d))                                     (SE-add, stem)
    f_i = SE_rgb(stage_i^rgb(f_{i-1})) + SE_d(stage_i^d(d_{i-1})),  i = 1..4          (SE-add, stages)
    y, (y_8, y_16, y_32) = Decoder(PPM(f_4), skip_3(f_3), skip_2(f_2), skip_1(f_1))

with SE(x) = x · σ(W_2 ReLU(W_1 GAP(x))) (reduction 16) and the depth stream d_i its own ResNet's stages
(max-pooled after the stem like the RGB one). As the public code (ESANet ``src/models/model.py``, DynMM
``FusionDynMM/src/models/``): skips are 1x1 ConvBNAct to the decoder width where widths differ and added to
the upsampled decoder features; PPM with bins (1, 5), 1x1 reductions and nearest upsampling; each decoder
module is ConvBNAct 3x3, ``decoder_blocks`` NonBottleneck1D blocks, a 1x1 side output (training only) and a
learned x2 upsampling (nearest, then a depthwise 3x3 initialised to the bilinear kernel); the head is a 3x3
conv to the classes and two learned x2 upsamplings, so the logits have the input's size. In training the
output's ``extras["side_logits"]`` holds the side outputs at /8, /16 and /32 (multi-scale supervision).

Costs: on its first batch the model counts its multiply-adds at batch 1 (`count_madds`) with depth fused at
the first k = 0..4 stages (``branch_madds``; k = 4 is this network, k = 0 fuses at the stem only) and logs
``cost/gmacs`` (GMACs per image) and ``cost/depth_gmacs`` (what depth fusion beyond the stem costs: total
minus branch 0's, the depth encoder's stages and SE blocks), the columns of DynMM's Tables 3-4.

Inputs: ``{"rgb": (B, 3, H, W), "depth": (B, 1, H, W)}`` with H and W multiples of 32. Encoders come from
the backbone (`fusionbench.encoders.resnet.ResNetTrunk`, one per modality, equal widths). Without a
``depth`` encoder the model is the RGB-only ESANet (no fusion).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fusionbench.compute import count_madds
from fusionbench.errors import ConfigError
from fusionbench.fusion.base import FusionOutput, as_module_dict


class ConvBNAct(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel_size: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.fc = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(F.adaptive_avg_pool2d(x, 1))


class SEFusionAdd(nn.Module):
    """``SE_rgb(rgb) + SE_depth(depth)``: each stream re-weights its own channels, then they are added."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.se_rgb = SqueezeExcite(channels, reduction)
        self.se_depth = SqueezeExcite(channels, reduction)

    def forward(self, rgb: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        return self.se_rgb(rgb) + self.se_depth(depth)


class NonBottleneck1D(nn.Module):
    """ERFNet's factorised residual block (3x1, 1x3, BN, 3x1, 1x3, BN, + input), ESANet's decoder block."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        c = channels
        self.conv3x1_1 = nn.Conv2d(c, c, (3, 1), padding=(1, 0))
        self.conv1x3_1 = nn.Conv2d(c, c, (1, 3), padding=(0, 1))
        self.bn1 = nn.BatchNorm2d(c)
        self.conv3x1_2 = nn.Conv2d(c, c, (3, 1), padding=(1, 0))
        self.conv1x3_2 = nn.Conv2d(c, c, (1, 3), padding=(0, 1))
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv3x1_1(x))
        out = F.relu(self.bn1(self.conv1x3_1(out)))
        out = F.relu(self.conv3x1_2(out))
        out = self.bn2(self.conv1x3_2(out))
        return F.relu(out + x)


class LearnedUpsample(nn.Module):
    """x2 nearest, then a depthwise 3x3 conv (zero padding) initialised to the bilinear kernel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        kernel = torch.tensor([[0.0625, 0.125, 0.0625], [0.125, 0.25, 0.125], [0.0625, 0.125, 0.0625]])
        with torch.no_grad():
            self.conv.weight.copy_(kernel.expand(channels, 1, 3, 3))
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling: pooled to each bin, 1x1 reduced, upsampled (nearest), concatenated with the
    input and fused by a 1x1 ConvBNAct."""

    def __init__(self, c_in: int, c_out: int, bins: Sequence[int] = (1, 5)) -> None:
        super().__init__()
        reduced = c_in // len(bins)
        self.bins = [int(b) for b in bins]
        self.branches = nn.ModuleList(ConvBNAct(c_in, reduced, 1) for _ in self.bins)
        self.final = ConvBNAct(c_in + reduced * len(self.bins), c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        parts = [x] + [
            F.interpolate(branch(F.adaptive_avg_pool2d(x, b)), size, mode="nearest")
            for b, branch in zip(self.bins, self.branches, strict=True)
        ]
        return self.final(torch.cat(parts, dim=1))


class DecoderModule(nn.Module):
    def __init__(self, c_in: int, c_out: int, blocks: int, num_classes: int) -> None:
        super().__init__()
        self.conv = ConvBNAct(c_in, c_out, 3)
        self.blocks = nn.Sequential(*(NonBottleneck1D(c_out) for _ in range(blocks)))
        self.side = nn.Conv2d(c_out, num_classes, 1)
        self.upsample = LearnedUpsample(c_out)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.blocks(self.conv(x))
        side = self.side(x) if self.training else None
        return self.upsample(x) + skip, side


class ESANetFusion(nn.Module):
    """Args:
    encoders: ``rgb`` and (optionally) ``depth`` ResNet trunks with equal ``channels``.
    num_outputs: classes.
    decoder_channels: widths of the three decoder modules (ESANet-R50 in DynMM: 512, 256, 128).
    decoder_blocks: NonBottleneck1D blocks per decoder module.
    context_bins: PPM bins (ESANet ``ppm``: 1 and 5); empty: no context module.
    se_reduction: channel reduction of the SE fusion blocks.
    """

    STRIDE = 32
    BRANCHES = 5  # depth fused at the first k = 0..4 stages

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        num_outputs: int,
        decoder_channels: Sequence[int] = (512, 256, 128),
        decoder_blocks: Sequence[int] = (3, 3, 3),
        context_bins: Sequence[int] = (1, 5),
        se_reduction: int = 16,
    ) -> None:
        super().__init__()
        self.encoders = as_module_dict(encoders)
        if "rgb" not in self.encoders or set(self.encoders) - {"rgb", "depth"}:
            raise ConfigError(
                f"ESANet needs an `rgb` encoder and optionally a `depth` one; the backbone built "
                f"{sorted(self.encoders)}. Use an RGB-D dataset (dataset=nyuv2 | rgbd_synthetic)."
            )
        self.has_depth = "depth" in self.encoders
        chans = list(self.encoders["rgb"].channels)
        if self.has_depth and list(self.encoders["depth"].channels) != chans:
            raise ConfigError(
                f"ESANet adds depth features to RGB ones, so both trunks need equal widths; rgb has "
                f"{chans}, depth {list(self.encoders['depth'].channels)}. Give backbone.rgb and "
                "backbone.depth the same arch (and widths)."
            )
        if len(decoder_channels) != 3 or len(decoder_blocks) != 3:
            raise ConfigError(
                "ESANet has three decoder modules: give 3 decoder_channels and 3 decoder_blocks."
            )
        self.channels = chans
        self.num_outputs = int(num_outputs)
        dec = [int(c) for c in decoder_channels]
        self.fusions = nn.ModuleList(SEFusionAdd(c, se_reduction) for c in chans) if self.has_depth else None
        # skips from stages 1..3 (at /4, /8, /16) into decoder modules 3, 2, 1
        self.skips = nn.ModuleList(
            ConvBNAct(c, d, 1) if c != d else nn.Identity()
            for c, d in zip(chans[1:4], reversed(dec), strict=True)
        )
        self.context = PyramidPooling(chans[4], dec[0], context_bins) if context_bins else None
        c_in = dec[0] if context_bins else chans[4]
        self.decoder = nn.ModuleList()
        for c_out, blocks in zip(dec, decoder_blocks, strict=True):
            self.decoder.append(DecoderModule(c_in, c_out, int(blocks), self.num_outputs))
            c_in = c_out
        self.head = nn.Sequential(
            nn.Conv2d(dec[-1], self.num_outputs, 3, padding=1),
            LearnedUpsample(self.num_outputs),
            LearnedUpsample(self.num_outputs),
        )
        self.register_buffer("branch_madds", torch.zeros(self.BRANCHES, dtype=torch.long))
        self.register_buffer("costs_measured", torch.tensor(False))
        self.forced_branch: int | None = None  # cost measurement and timing: every image on this branch

    # -- costs ------------------------------------------------------------------------------------------
    def measure_costs(self, inputs: Mapping[str, torch.Tensor]) -> None:
        """Multiply-adds of the whole network with depth fused at the first k stages, k = 0..4, at batch 1."""
        one = {m: x[:1] for m, x in inputs.items()}
        counts = []
        try:
            for k in range(self.BRANCHES):
                self.forced_branch = k
                counts.append(count_madds(self, one).madds)
        finally:
            self.forced_branch = None
        self.branch_madds.copy_(torch.tensor(counts, dtype=torch.long))
        self.costs_measured.fill_(True)

    def cost_info(self, share: torch.Tensor) -> dict[str, torch.Tensor]:
        """Expected GMACs per image, total and for depth beyond the stem, for branch shares ``share`` (5,)."""
        madds = self.branch_madds.to(share) / 1e9
        return {"cost/gmacs": (share * madds).sum(), "cost/depth_gmacs": (share * (madds - madds[0])).sum()}

    # -- pieces the fusion-level DynMM reuses -------------------------------------------------------------
    def check_inputs(self, inputs: Mapping[str, torch.Tensor]) -> None:
        needed = ["rgb", "depth"] if self.has_depth else ["rgb"]
        missing = [m for m in needed if m not in inputs]
        if missing:
            raise ConfigError(f"ESANet needs inputs {needed}; the batch lacks {missing}.")
        h, w = inputs["rgb"].shape[-2:]
        if h % self.STRIDE or w % self.STRIDE:
            raise ConfigError(
                f"ESANet's input must be a multiple of {self.STRIDE} pixels high and wide (its encoder "
                f"downsamples 32 times and its decoder adds skips); got {h}x{w}. Set dataset.height / "
                "dataset.width (NYUv2: 480 x 640)."
            )

    def stems(self, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(RGB stream after the stem fusion and max-pool, depth stream after its stem and max-pool)."""
        rgb = self.encoders["rgb"].forward_stem(inputs["rgb"])
        depth = None
        if self.has_depth:
            depth = self.encoders["depth"].forward_stem(inputs["depth"])
            rgb = self.fusions[0](rgb, depth)
            depth = F.max_pool2d(depth, 3, 2, 1)
        return F.max_pool2d(rgb, 3, 2, 1), depth

    def decode(self, features: torch.Tensor, skips: Sequence[torch.Tensor]) -> FusionOutput:
        """``skips``: the fused stage-1..3 features (before the 1x1 skip layers)."""
        x = self.context(features) if self.context is not None else features
        sides = []
        for module, skip_layer, skip in zip(self.decoder, reversed(self.skips), reversed(skips), strict=True):
            x, side = module(x, skip_layer(skip))
            sides.append(side)
        logits = self.head(x)
        extras = {"side_logits": sides[::-1]} if self.training else None  # /8, /16, /32
        return FusionOutput(logits, None, {}, extras)

    def encode(self, inputs: Mapping[str, torch.Tensor], depth_stages: int = 4) -> tuple[torch.Tensor, list]:
        """Fused stage-4 features and the stage-1..3 skips, fusing depth at the first ``depth_stages`` stages
        only; the depth encoder runs no further than that (fusion-level DynMM's branch ``k``)."""
        rgb, depth = self.stems(inputs)
        skips = []
        for i in range(4):
            rgb = self.encoders["rgb"].forward_stage(i, rgb)
            if depth is not None and i < depth_stages:
                depth = self.encoders["depth"].forward_stage(i, depth)
                rgb = self.fusions[i + 1](rgb, depth)
            if i < 3:
                skips.append(rgb)
        return rgb, skips

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> FusionOutput:
        self.check_inputs(inputs)
        if not bool(self.costs_measured) and self.forced_branch is None:
            self.measure_costs(inputs)  # once, on the first batch
        k = self.BRANCHES - 1 if self.forced_branch is None else self.forced_branch
        out = self.decode(*self.encode(inputs, depth_stages=k))
        share = torch.zeros(self.BRANCHES, device=out.logits.device)
        share[k if self.has_depth else 0] = 1.0
        return out._replace(info=self.cost_info(share))


__all__ = ["ESANetFusion", "LearnedUpsample", "NonBottleneck1D", "PyramidPooling", "SEFusionAdd"]
