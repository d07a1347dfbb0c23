"""LeNet-style convolutional encoder with MultiBench's AV-MNIST sizes.

``conv5x5(pad 2, no bias) -> BN -> ReLU -> maxpool2``, then ``extra_layers`` blocks of
``conv3x3(pad 1, no bias) -> BN -> ReLU -> maxpool2`` doubling the channels each time, then a global
average pool (a no-op on AV-MNIST, whose maps are 1x1 by then). Image: ``channels=6, extra_layers=3``
-> 48-d; audio spectrogram: ``channels=6, extra_layers=5`` -> 192-d (benchmark-specs §2.1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fusionbench.encoders.context import ContextEncoder


class LeNetEncoder(ContextEncoder):
    """Args:
        in_channels: input channels (1 for AV-MNIST).
        channels: output channels of the first block; block k has ``channels * 2**k``.
        extra_layers: 3x3 blocks after the first 5x5 block.
        output_dim: optional linear projection of the pooled features (MFM/Refnet use 200 / 192);
            None keeps the last block's channels.

    A context joins after the convolution of block k (before its batch norm), as if appended as
    constant channels to that block's input. `layer_outputs` returns every block's pooled output
    (MFAS fuses intermediate layers).
    """

    width_key = "output_dim"  # the argument that sets output_dim

    def __init__(
        self, in_channels: int = 1, channels: int = 6, extra_layers: int = 3, output_dim: int | None = None
    ) -> None:
        super().__init__()
        widths = [channels * 2**k for k in range(extra_layers + 1)]
        self.convs = nn.ModuleList(
            [nn.Conv2d(in_channels, widths[0], kernel_size=5, padding=2, bias=False)]
            + [
                nn.Conv2d(widths[k], widths[k + 1], kernel_size=3, padding=1, bias=False)
                for k in range(extra_layers)
            ]
        )
        self.norms = nn.ModuleList([nn.BatchNorm2d(w) for w in widths])
        self.widths = widths
        self.proj = nn.Linear(widths[-1], output_dim) if output_dim else None
        self.output_dim = int(output_dim or widths[-1])

    def join_widths(self) -> list[int]:
        return list(self.widths)

    def truncate(self, blocks: int) -> None:
        """Keep only the first ``blocks`` blocks (MFAS fuses intermediate layers: blocks after the last
        fused one would be parameters without gradient, which DDP rejects)."""
        if not 1 <= blocks <= len(self.convs):
            raise ValueError(f"LeNetEncoder has {len(self.convs)} blocks; cannot keep {blocks}.")
        if self.proj is not None and blocks < len(self.convs):
            raise ValueError(
                "Cannot truncate a LeNetEncoder with an output projection (its input width would change)."
            )
        self.convs, self.norms = self.convs[:blocks], self.norms[:blocks]
        self.widths = self.widths[:blocks]
        self.output_dim = int(self.widths[-1])

    def blocks(self, x: torch.Tensor, context: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Feature maps after every block (B, C_k, H_k, W_k)."""
        if x.dim() == 3:  # (B, H, W) -> one channel
            x = x.unsqueeze(1)
        maps = []
        for k, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = F.max_pool2d(F.relu(norm(self.join(k, conv(x), context))), 2)
            maps.append(x)
        return maps

    def layer_outputs(self, x: torch.Tensor, context: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Globally pooled output of every block (B, C_k)."""
        return [F.adaptive_avg_pool2d(m, 1).flatten(1) for m in self.blocks(x, context)]

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        h = F.adaptive_avg_pool2d(self.blocks(x, context)[-1], 1).flatten(1)
        return self.proj(h) if self.proj is not None else h
