"""Shared pieces of the RGB-D segmentation datasets: PNG reading, median-frequency class weights and
ESANet's training augmentation.

Label maps are handled in their file encoding here (uint8, 0 = void, 1..C); the datamodules shift them
to the batch contract (void = -1, classes 0..C-1) after augmentation. Everything is numpy in and out,
with image layout (H, W[, 3]) as the files hold it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fusionbench.errors import DatasetError

# -- PNG -------------------------------------------------------------------------------------------


def _image_module():
    try:
        from PIL import Image
    except ImportError:  # pillow comes with the `vision` extra
        raise DatasetError(
            "Reading the PNG images of an RGB-D dataset needs Pillow: `pip install pillow` "
            "(or `pip install -e .[vision]`)."
        ) from None
    return Image


def _open(path: Path, what: str):
    Image = _image_module()
    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise DatasetError(f"{what} {path} does not exist.") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise DatasetError(f"{what} {path} is not a readable PNG ({e}); re-create the file.") from None
    return img


def read_rgb(path: Path) -> np.ndarray:
    """An 8-bit colour image as (H, W, 3) uint8 (palette / grey images are converted to RGB)."""
    img = _open(Path(path), "RGB image")
    if img.mode not in ("RGB", "RGBA", "P", "L"):
        raise DatasetError(f"RGB image {path} has PIL mode {img.mode!r}; expected an 8-bit RGB PNG.")
    return np.array(img.convert("RGB"), dtype=np.uint8)


def read_depth(path: Path) -> np.ndarray:
    """A 16-bit single-channel depth image (millimetres) as (H, W) uint16."""
    img = _open(Path(path), "Depth image")
    arr = np.array(img)  # a writable copy (torch.from_numpy warns on read-only arrays)
    if arr.ndim != 2 or arr.dtype.kind not in "ui":
        raise DatasetError(
            f"Depth image {path} is {img.mode} with shape {arr.shape}; expected a single-channel 16-bit PNG "
            "(depth in millimetres)."
        )
    if arr.dtype != np.uint16:  # some readers give mode "I" (int32) for 16-bit PNGs
        if arr.min() < 0 or arr.max() > np.iinfo(np.uint16).max:
            raise DatasetError(f"Depth image {path} holds values outside 0..65535; re-create the file.")
        arr = arr.astype(np.uint16)
    return arr


def read_label(path: Path) -> np.ndarray:
    """A label map (class ids, 0 = void) as (H, W) uint8; palette PNGs give their indices."""
    img = _open(Path(path), "Label image")
    if img.mode not in ("L", "P"):
        raise DatasetError(
            f"Label image {path} has PIL mode {img.mode!r}; expected an 8-bit single-channel or palette PNG "
            "of class ids."
        )
    return np.array(img, dtype=np.uint8)


def write_png(path: Path, array: np.ndarray) -> None:
    """Write (H, W, 3) uint8 as RGB, (H, W) uint8 as 8-bit grey, (H, W) uint16 as 16-bit grey."""
    Image = _image_module()
    array = np.ascontiguousarray(array)
    if array.dtype not in (np.uint8, np.uint16) or array.ndim not in (2, 3):
        raise ValueError(
            f"write_png takes (H, W[, 3]) uint8 or (H, W) uint16, got {array.dtype} {array.shape}"
        )
    Image.fromarray(array).save(path, format="PNG")


# -- class weights ---------------------------------------------------------------------------------


def class_pixel_counts(labels: Iterable[np.ndarray], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(pixel_counts, image_pixel_counts)``, each (C,) float64 over the non-void classes 1..C of label
    maps in file encoding (0 = void): the pixels of each class, and the total pixels of the images in which
    the class occurs at all (what median-frequency weighting divides by). Raises ValueError for a value > C.
    """
    pixels = np.zeros(num_classes + 1, dtype=np.float64)
    image_pixels = np.zeros(num_classes + 1, dtype=np.float64)
    for label in labels:
        label = np.asarray(label)
        if label.size and int(label.max()) > num_classes:
            raise ValueError(f"label value {int(label.max())} > {num_classes} classes")
        counts = np.bincount(label.ravel().astype(np.int64), minlength=num_classes + 1)
        pixels += counts
        image_pixels += (counts > 0) * label.size
    return pixels[1:], image_pixels[1:]


def median_frequency_weights(
    pixel_counts: Sequence[float], image_pixel_counts: Sequence[float]
) -> np.ndarray:
    """Median-frequency class weights (Eigen & Fergus; ESANet's ``compute_class_weights``):
    ``freq_c = pixels_c / pixels of the images containing c`` and ``w_c = median(freq) / freq_c``.

    A class that never occurs gets weight 0 (ESANet would produce NaN and stop) and is left out of the
    median, so the weights of the seen classes are what ESANet computes over them. (C,) float64.
    """
    pixels = np.asarray(pixel_counts, dtype=np.float64)
    image_pixels = np.asarray(image_pixel_counts, dtype=np.float64)
    if pixels.shape != image_pixels.shape or pixels.ndim != 1:
        raise ValueError(f"expected two (C,) arrays, got {pixels.shape} and {image_pixels.shape}")
    seen = (pixels > 0) & (image_pixels > 0)
    weights = np.zeros_like(pixels)
    if seen.any():
        freq = pixels[seen] / image_pixels[seen]
        weights[seen] = np.median(freq) / freq
    return weights


# -- resizing and augmentation ---------------------------------------------------------------------


def resize(array: np.ndarray, height: int, width: int, mode: str) -> np.ndarray:
    """Resize (H, W) or (H, W, 3) to (height, width), keeping the dtype. ``mode``: ``"bilinear"``
    (half-pixel centres, no antialiasing, rounded for integer types: OpenCV's INTER_LINEAR, which ESANet
    uses for RGB) or ``"nearest"`` (source index floor(dst * scale): OpenCV's INTER_NEAREST, which ESANet
    uses for depth and labels, so no value is invented)."""
    if array.shape[:2] == (height, width):
        return array
    t = torch.from_numpy(np.ascontiguousarray(array).astype(np.float32, copy=False))
    t = t.unsqueeze(0).unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).unsqueeze(0)
    if mode == "bilinear":
        out = F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)
    elif mode == "nearest":
        out = F.interpolate(t, size=(height, width), mode="nearest")
    else:
        raise ValueError(f"resize mode must be 'bilinear' or 'nearest', got {mode!r}")
    out = out[0, 0] if array.ndim == 2 else out[0].permute(1, 2, 0)
    res = out.numpy()
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        res = np.clip(np.rint(res), info.min, info.max)
    return np.ascontiguousarray(res.astype(array.dtype, copy=False))


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return float(low + (high - low) * torch.rand((), generator=generator, dtype=torch.float64))


def _randint(high: int, generator: torch.Generator | None) -> int:
    """Uniform in 0..high (inclusive)."""
    return int(torch.randint(0, high + 1, (), generator=generator))


def jitter_hsv(rgb: np.ndarray, factors: Sequence[float]) -> np.ndarray:
    """ESANet's RandomHSV step: hue, saturation and value (each in [0, 1]) multiplied by ``factors`` and
    clipped to [0, 1]; the result is truncated back to uint8 as ESANet does."""
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    hsv = rgb_to_hsv(rgb.astype(np.float32) / 255.0)
    hsv = np.clip(hsv * np.asarray(factors, dtype=np.float32), 0.0, 1.0)
    return (hsv_to_rgb(hsv) * 255.0).astype(np.uint8)


class RGBDTrainAugment:
    """ESANet's training augmentation (``src/preprocessing.py``, phase "train") on one sample:

    1. random rescale by a factor drawn from ``scale`` (1.0-1.4), the new size rounded;
    2. random crop to ``height`` x ``width``; an image not larger than that in both sides is resized to it
       instead (ESANet's rule, so small images work too);
    3. HSV jitter of the RGB image: H, S and V multiplied by factors drawn from ``hsv`` (ESANet: 0.9-1.1
       each), clipped; ``hsv=None`` switches it off;
    4. horizontal flip with probability 1/2.

    The same geometric transform goes to all three arrays: bilinear for RGB, nearest for depth and label,
    so no depth value or class id is invented at a boundary. Randomness comes from torch's generator
    (``generator``, else the global one), so Lightning's ``seed_everything`` and its per-worker seeding make
    a run reproducible. The crop offset is uniform over every valid position (ESANet's ``randint(0, h -
    crop)`` never picks the last one). Normalisation is not part of this: the datamodule does it after.

    Call with ``rgb`` (H, W, 3) uint8, ``depth`` (H, W) float32 (millimetres) and ``label`` (H, W) uint8 in
    file encoding; ``rgb`` or ``depth`` may be None (a modality not loaded). Returns the three arrays.
    """

    def __init__(
        self,
        height: int,
        width: int,
        scale: Sequence[float] = (1.0, 1.4),
        hsv: Sequence[Sequence[float]] | None = ((0.9, 1.1), (0.9, 1.1), (0.9, 1.1)),
        flip: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        if height < 1 or width < 1:
            raise ValueError(f"crop size must be positive, got {height} x {width}")
        self.height, self.width = int(height), int(width)
        self.scale = (float(min(scale)), float(max(scale)))
        self.hsv = None if hsv is None else [(float(min(r)), float(max(r))) for r in hsv]
        if self.hsv is not None and len(self.hsv) != 3:
            raise ValueError(f"hsv needs three (low, high) ranges (hue, saturation, value), got {hsv}")
        self.flip = flip
        self.generator = generator

    def __call__(
        self, rgb: np.ndarray | None, depth: np.ndarray | None, label: np.ndarray
    ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray]:
        g = self.generator
        h, w = label.shape
        # 1. rescale
        s = _uniform(*self.scale, g)
        h2, w2 = max(1, int(round(s * h))), max(1, int(round(s * w)))
        arrays = self._geometric(rgb, depth, label, lambda a, m: resize(a, h2, w2, m))
        # 2. crop (or resize when the image is too small to crop)
        ch, cw = self.height, self.width
        if h2 <= ch or w2 <= cw:
            arrays = self._geometric(*arrays, lambda a, m: resize(a, ch, cw, m))
        else:
            i, j = _randint(h2 - ch, g), _randint(w2 - cw, g)
            arrays = self._geometric(*arrays, lambda a, m: a[i : i + ch, j : j + cw])
        rgb, depth, label = arrays
        # 3. colour
        if self.hsv is not None:
            factors = [_uniform(lo, hi, g) for lo, hi in self.hsv]
            if rgb is not None:
                rgb = jitter_hsv(rgb, factors)
        # 4. flip
        if self.flip and float(torch.rand((), generator=g)) > 0.5:
            rgb, depth, label = self._geometric(rgb, depth, label, lambda a, m: a[:, ::-1])
        return tuple(None if a is None else np.ascontiguousarray(a) for a in (rgb, depth, label))

    @staticmethod
    def _geometric(rgb, depth, label, fn) -> tuple:
        return (
            None if rgb is None else fn(rgb, "bilinear"),
            None if depth is None else fn(depth, "nearest"),
            fn(label, "nearest"),
        )
