"""A synthetic RGB-D segmentation task in which depth matters for some images only (DynMM's fusion-level
claim, on a scale a CPU trains): generated from a seed, nothing on disk.

Every image is a floor/wall background (class 0, depth a plane receding upwards) with ``objects`` discs and
rectangles of classes 1..C-1. Two kinds of scene, ``dark_fraction`` of them dark:

- **lit**: every class has its own colour (``PALETTE``), so RGB alone segments the scene; objects stand at
  random depths, so depth shows their outlines but not their class.
- **dark**: illumination x ``dark_gain`` plus sensor noise, and classes come in pairs that share one
  colour (1 and 2, 3 and 4, ...); within a pair the odd class stands near and the even one far, so only
  depth tells them apart. A dark scene is visible as such in the stem features (its brightness), so a
  gate can learn to fuse depth for dark scenes and skip it for lit ones.

Pixels within ``void_width`` of an object's outline are void (label -1, like NYUv2's unlabeled pixels).
RGB is normalised by fixed per-channel statistics, depth by the training split's mean and std. Batches follow
the RGB-D contract of `fusionbench.data.nyuv2`: ``rgb`` (3, H, W), ``depth`` (1, H, W), target (H, W) int64.
Every sample's ``meta`` carries ``dark`` (1 for dark scenes), for per-kind analyses of the routing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from fusionbench.data.base import FusionDataModule
from fusionbench.errors import DatasetError

PALETTE = torch.tensor(
    [
        [0.90, 0.15, 0.15],
        [0.15, 0.75, 0.20],
        [0.20, 0.30, 0.95],
        [0.95, 0.85, 0.10],
        [0.80, 0.20, 0.85],
        [0.10, 0.85, 0.85],
        [0.95, 0.55, 0.10],
        [0.50, 0.25, 0.10],
    ]
)
NEAR, FAR = 0.25, 0.55  # dark scenes: odd classes near, even classes far (depth in [0, 1], 1 = far wall)


class SegmentationTensors(Dataset):
    """In-memory RGB-D segmentation samples."""

    def __init__(
        self,
        inputs: Mapping[str, torch.Tensor],
        target: torch.Tensor,
        dark: torch.Tensor,
    ) -> None:
        self.inputs, self.target, self.dark = dict(inputs), target, dark

    def __len__(self) -> int:
        return len(self.target)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "inputs": {m: x[i] for m, x in self.inputs.items()},
            "target": self.target[i],
            "meta": {"dark": self.dark[i]},
        }


class RGBDSyntheticDataModule(FusionDataModule):
    """Args:
    size: image height and width (a multiple of 32 for ESANet; DynMM's gate needs at least 68).
    num_classes: C, background included (at most 1 + len(PALETTE); odd C - 1 leaves the last class unpaired,
        so give an odd C).
    objects: objects per image.
    dark_fraction: share of dark scenes (depth needed) per split.
    dark_gain: illumination of dark scenes.
    noise: RGB noise std in lit scenes (dark scenes: 3x, relative to their dimmer image).
    depth_noise: depth noise std (in [0, 1] depth units).
    void_width: pixels around each outline labelled void.
    num_samples: ``{"train": n, "val": n, "test": n}``.
    seed: data seed.
    """

    def __init__(
        self,
        size: int = 96,
        num_classes: int = 7,
        objects: int = 4,
        dark_fraction: float = 0.5,
        dark_gain: float = 0.3,
        noise: float = 0.03,
        depth_noise: float = 0.02,
        void_width: float = 0.75,
        num_samples: Mapping[str, int] | None = None,
        seed: int = 0,
        modalities: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("name", "rgbd_synthetic")
        kwargs.setdefault("data_dir", ".")
        super().__init__(**kwargs)
        if not 3 <= num_classes <= 1 + len(PALETTE) or num_classes % 2 == 0:
            raise DatasetError(
                f"dataset.num_classes must be odd and in [3, {1 + len(PALETTE)}] (background + pairs of "
                f"classes sharing a colour in dark scenes), got {num_classes}."
            )
        if not 0.0 <= dark_fraction <= 1.0:
            raise DatasetError(f"dataset.dark_fraction must lie in [0, 1], got {dark_fraction}.")
        self.size, self.num_classes, self.objects = int(size), int(num_classes), int(objects)
        self.dark_fraction, self.dark_gain = float(dark_fraction), float(dark_gain)
        self.noise, self.depth_noise, self.void_width = float(noise), float(depth_noise), float(void_width)
        self.num_samples = dict(num_samples or {"train": 800, "val": 200, "test": 400})
        self.seed = int(seed)
        self.task_type, self.num_outputs = "segmentation", self.num_classes
        self.modalities = self.select_modalities(["depth", "rgb"], modalities)
        dims = {"rgb": 3 * self.size**2, "depth": self.size**2}
        self.input_dims = {m: dims[m] for m in self.modalities}
        self.class_weights: torch.Tensor | None = None

    def prepare_data(self) -> None:
        self.data_checksum = (
            f"rgbd_synthetic-s{self.size}-c{self.num_classes}-o{self.objects}-d{self.dark_fraction}"
            f"-seed{self.seed}"
        )

    def sample(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        """(rgb (n, 3, S, S) in [0, 1], depth (n, 1, S, S) in [0, 1], target (n, S, S), dark (n,))."""
        s = self.size
        yy, xx = torch.meshgrid(
            torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32), indexing="ij"
        )
        dark = (torch.rand(n, generator=g) < self.dark_fraction).long()
        wall = 0.45 + 0.25 * torch.rand(n, 1, 1, generator=g)  # background grey level
        rgb = wall.unsqueeze(1).expand(n, 3, s, s).clone()
        rgb += 0.05 * torch.sin(xx / (2 + 4 * torch.rand(n, 1, 1, 1, generator=g)))  # wall texture
        depth = (1.0 - 0.3 * yy / s).expand(n, s, s).clone()  # a floor receding towards the top
        target = torch.zeros(n, s, s, dtype=torch.long)
        void = torch.zeros(n, s, s, dtype=torch.bool)
        for i in range(n):
            for _ in range(self.objects):
                c = int(torch.randint(1, self.num_classes, (1,), generator=g))
                cy, cx = (torch.rand(2, generator=g) * (s - 16) + 8).tolist()
                r = float(torch.rand(1, generator=g)) * s / 10 + s / 14
                if bool(torch.rand(1, generator=g) < 0.5):
                    sd = torch.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) - r  # disc
                else:
                    sd = torch.maximum((yy - cy).abs() - r, (xx - cx).abs() - 0.7 * r)  # rectangle
                inside = sd < 0
                if dark[i]:
                    colour = PALETTE[(c - 1) // 2]  # pairs share a colour
                    d = NEAR if c % 2 == 1 else FAR
                else:
                    colour = PALETTE[c - 1]
                    d = float(torch.rand(1, generator=g)) * (FAR - NEAR + 0.2) + NEAR - 0.1
                colour = colour + 0.05 * torch.randn(3, generator=g)
                rgb[i][:, inside] = colour.view(3, 1).clamp(0, 1)
                depth[i][inside] = d
                target[i][inside] = c
                void[i] = (void[i] & ~inside) | (
                    sd.abs() < self.void_width
                )  # later objects cover earlier ones
        gain = torch.where(dark.bool(), self.dark_gain, 1.0).view(n, 1, 1, 1)
        noise = torch.where(dark.bool(), 3 * self.noise * self.dark_gain, self.noise).view(n, 1, 1, 1)
        rgb = (rgb * gain + noise * torch.randn(rgb.shape, generator=g)).clamp(0, 1)
        depth = depth.unsqueeze(1) + self.depth_noise * torch.randn(n, 1, s, s, generator=g)
        target[void] = -1
        return rgb, depth, target, dark

    def _load(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        splits = {k: self.sample(int(self.num_samples[k]), g) for k in ("train", "val", "test")}
        rgb_mean, rgb_std = (
            torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1),
            torch.tensor([0.25] * 3).view(1, 3, 1, 1),
        )
        d_mean, d_std = splits["train"][1].mean(), splits["train"][1].std()
        self.depth_stats = (float(d_mean), float(d_std))
        counts = torch.bincount(
            splits["train"][2][splits["train"][2] >= 0], minlength=self.num_classes
        ).double()
        freq = counts / counts.sum()
        self.class_weights = (freq.median() / freq.clamp_min(1e-12)).float()  # median frequency (every image
        # is full-size, so ESANet's per-image normalisation reduces to the class share)
        made = {}
        for k, (rgb, depth, target, dark) in splits.items():
            inputs = {"rgb": (rgb - rgb_mean) / rgb_std, "depth": (depth - d_mean) / d_std}
            made[k] = SegmentationTensors({m: inputs[m] for m in self.modalities}, target, dark)
        self.train_set, self.val_set, self.test_set = made["train"], made["val"], made["test"]


__all__ = ["PALETTE", "RGBDSyntheticDataModule"]
