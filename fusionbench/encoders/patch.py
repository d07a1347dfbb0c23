"""Patch-embedding encoder (ViT tokeniser) for transformer fusions such as MBT.

``Conv2d(C -> dim, kernel = stride = patch_size)`` cuts a square image into non-overlapping patches and
embeds each one linearly; a learned positional embedding is added. The output is the token sequence
(B, N, dim), N = (image_size / patch_size)^2 -- the transformer layers live in the fusion model, which
needs them interleaved across modalities (MBT's bottleneck layers).

A context (Pro-Fusion) joins at the single layer there is: ``B c`` is added to every patch embedding
before the positional embedding, i.e. as if c were appended to every patch's pixels.
"""

from __future__ import annotations

import torch
from torch import nn

from fusionbench.encoders.context import ContextEncoder
from fusionbench.errors import ConfigError


class PatchEncoder(ContextEncoder):
    """Args:
    in_channels: image channels (1 for AV-MNIST).
    image_size: side of the square input (AV-MNIST image 28, audio spectrogram 112).
    patch_size: side of a patch; must divide ``image_size`` (MBT on AV-MNIST: 7 and 16).
    dim: token width, ``output_dim``.
    """

    width_key = "dim"  # the argument that sets output_dim

    def __init__(
        self, in_channels: int = 1, image_size: int = 28, patch_size: int = 7, dim: int = 64
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ConfigError(f"PatchEncoder: patch_size {patch_size} must divide image_size {image_size}.")
        self.image_size, self.patch_size = int(image_size), int(patch_size)
        self.num_patches = (image_size // patch_size) ** 2
        self.embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.pos = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, self.num_patches, dim), std=0.02))
        self.output_dim = int(dim)

    def join_widths(self) -> list[int]:
        return [self.output_dim]

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() == 3:  # (B, H, W) -> one channel
            x = x.unsqueeze(1)
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ConfigError(
                f"PatchEncoder was built for {self.image_size}x{self.image_size} inputs but got "
                f"{tuple(x.shape[-2:])}; set image_size in the backbone config."
            )
        h = self.join(0, self.embed(x), context)  # (B, dim, H/p, W/p)
        return h.flatten(2).transpose(1, 2) + self.pos
