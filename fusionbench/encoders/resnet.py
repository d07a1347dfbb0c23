"""ResNet trunks for dense prediction: the stem and the four stages, callable one at a time.

ESANet (Seichter et al. 2021) and fusion-level DynMM fuse an RGB and a depth ResNet after the stem and
after every stage, so a trunk exposes ``forward_stem`` (conv 7x7/2 -> BN -> ReLU, no max-pool: ESANet
fuses before pooling) and ``forward_stage(i, x)`` (i = 0..3, max-pool applied before stage 0 by the
caller), plus ``channels``: the widths after the stem and after each stage.

Architectures: ``resnet18`` / ``resnet34`` (torchvision BasicBlock) and ``resnet50`` (Bottleneck), built
with torchvision's blocks so ImageNet state dicts from ``torchvision.models.<arch>(weights=...)`` load
(``weights``: a local file, never downloaded). ESANet's default R34 uses its own NonBottleneck1D blocks;
torchvision's BasicBlock is the R34 here (the DynMM recipe, ESANet-R50, is identical). ``small``: the
BasicBlock trunk with the widths and block counts given (``widths``, ``blocks``), for CPU studies.

A trunk with ``in_channels`` other than 3 (depth: 1) loads conv1 as the sum of the RGB filters over the
input channels, as ESANet's depth encoder does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet as tv

from fusionbench.errors import ConfigError, check_choices

ARCHS = {
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
}
ARCH_NAMES = (*ARCHS, "small")


class ResNetTrunk(nn.Module):
    """Args:
    arch: ``resnet18`` | ``resnet34`` | ``resnet50`` | ``small``.
    in_channels: 3 for RGB, 1 for depth.
    weights: a local ImageNet state-dict file of the torchvision ``arch`` (None: random init).
    widths: ``small`` only: the four stage widths (the stem has the first).
    blocks: ``small`` only: BasicBlocks per stage.
    """

    def __init__(
        self,
        arch: str = "resnet34",
        in_channels: int = 3,
        weights: str | None = None,
        widths: Sequence[int] = (16, 32, 64, 128),
        blocks: Sequence[int] = (1, 1, 1, 1),
    ) -> None:
        super().__init__()
        check_choices("backbone.<modality>", {"arch": (arch, ARCH_NAMES)})
        self.arch = arch
        if arch == "small":
            if len(widths) != 4 or len(blocks) != 4:
                raise ConfigError(
                    f"arch=small needs four widths and four block counts, got {widths}, {blocks}."
                )
            kind, counts, planes, stem = "basic", list(blocks), [int(w) for w in widths], int(widths[0])
        else:
            kind, counts = ARCHS[arch]
            planes, stem = [64, 128, 256, 512], 64
        block = tv.BasicBlock if kind == "basic" else tv.Bottleneck
        self.conv1 = nn.Conv2d(in_channels, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.inplanes = stem
        self.layer1 = self._make_layer(block, planes[0], counts[0], 1)
        self.layer2 = self._make_layer(block, planes[1], counts[1], 2)
        self.layer3 = self._make_layer(block, planes[2], counts[2], 2)
        self.layer4 = self._make_layer(block, planes[3], counts[3], 2)
        self.channels = [stem] + [p * block.expansion for p in planes]
        self.output_dim = self.channels[-1]  # the encoder contract (`fusionbench.fusion.base.as_module_dict`)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if weights:
            if arch == "small":
                raise ConfigError("arch=small has no pretrained weights; leave `weights` empty.")
            self.load_imagenet(Path(weights), in_channels)

    def _make_layer(self, block: type[nn.Module], planes: int, n: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, n)]
        return nn.Sequential(*layers)

    def how_to_get(self, path: Path) -> str:
        return (
            'On a machine with internet run `python -c "import torch, torchvision; '
            f"torch.save(torchvision.models.{self.arch}(weights='IMAGENET1K_V1').state_dict(), "
            f"'{path.name}')\"`, copy the file to {path} (default folder: `paths.pretrained_dir`, env "
            "FUSIONBENCH_PRETRAINED_DIR), or set `backbone.rgb.weights` / `backbone.depth.weights` to it; "
            "`null` trains the trunk from a random init. fusionbench never downloads weights."
        )

    @property
    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def load_imagenet(self, path: Path, in_channels: int) -> None:
        path = path.expanduser()
        if not path.is_file():
            raise ConfigError(f"ResNet weights {path} do not exist. {self.how_to_get(path)}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the classifier is not used
        if in_channels != 3:  # depth: ESANet sums conv1's filters over the RGB channels
            state["conv1.weight"] = (
                state["conv1.weight"].sum(dim=1, keepdim=True).repeat(1, in_channels, 1, 1)
            )
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"{path} is not a torchvision {self.arch} state dict (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}). {self.how_to_get(path)}"
            )

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))

    def forward_stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.stages[i](x)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The whole trunk (stem, max-pool, four stages): the last stage's feature map."""
        x = nn.functional.max_pool2d(self.forward_stem(x), 3, 2, 1)
        for i in range(4):
            x = self.forward_stage(i, x)
        return x


__all__ = ["ARCH_NAMES", "ResNetTrunk"]
