"""Pretrained torchvision image backbones (VGG, ResNet) loaded from local state-dict files.

MM-IMDB's image features: gmu-mmimdb (Arevalo et al. 2017, ``vgg.py``) takes VGG-16's last hidden layer
(fc7, after its ReLU: 4,096); DEQ's raw-image runs (jinhong-ni/DEQFusion ``unimodals/common_models.py``
``ResNet152``) take ResNet-152's average-pooled last stage (2,048), optionally projected (``proj_dim``; DEQ
projects to 768 for its BERT-sized fusion).

The model is built with ``weights=None`` and, unless ``random_init``, its state dict is loaded from
``weights``: a file written by ``torch.save(torchvision.models.<arch>(weights=...).state_dict(), PATH)``
on a machine with internet. fusionbench never downloads weights. Input: the image modality, float
(B, 3, H, W) normalised as the weights expect (ImageNet mean / std, e.g. ``dataset=mmimdb_raw``).

Outputs (``output: pooled``, the only one): VGG ``features -> avgpool -> fc6 -> ReLU -> Dropout -> fc7 ->
ReLU`` (the classifier's last dropout and fc8 are dropped); ResNet ``stem .. layer4 -> avgpool``.

Freezing (``freeze``): ``none``; ``all`` (a fixed feature extractor); ``features`` (VGG: the convolutional
layers, fc6 / fc7 train; ResNet: the stem and layer1-3, layer4 trains). Frozen BatchNorm layers stay in
eval mode, so their running statistics stay the pretrained ones.

Pro-Fusion (`ContextEncoder`): one join, the context's projection added to the pooled features (before
``proj_dim``'s projection): ``h + B c``. The paper joins at the encoder's input; for a pretrained CNN the
pooled features are the one place where an added vector leaves the pretrained layers untouched.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fusionbench.encoders.context import ContextEncoder
from fusionbench.errors import ConfigError, check_choices

VGG = ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")
RESNET = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
ARCHS = VGG + RESNET
OUTPUTS = ("pooled",)
FREEZE = ("none", "all", "features")


def how_to_save(arch: str, path: str | Path) -> str:
    return (
        'On a machine with internet run `python -c "import torch, torchvision; '
        f"torch.save(torchvision.models.{arch}(weights='IMAGENET1K_V1').state_dict(), "
        f"'{Path(path).name}')\"`, copy the file to {path} (default folder: `paths.pretrained_dir`, env "
        "FUSIONBENCH_PRETRAINED_DIR) or point `backbone.image.weights` at it; "
        "`backbone.image.random_init=true` trains from scratch instead. fusionbench never downloads weights."
    )


def load_state_dict(model: nn.Module, arch: str, path: str | Path) -> None:
    """``model.load_state_dict`` from the file ``path`` (strict), every problem a `ConfigError`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"backbone.image.weights={path} does not exist. {how_to_save(arch, path)}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors vary by torch version
        raise ConfigError(
            f"backbone.image.weights={path} is not a readable torch file ({type(e).__name__}: {e}). "
            f"{how_to_save(arch, path)}"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(
            f"backbone.image.weights={path} holds a {type(state).__name__}, not a state dict. "
            f"{how_to_save(arch, path)}"
        )
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise ConfigError(
            f"backbone.image.weights={path} does not fit torchvision's {arch} ({first} ...): is it the state "
            f"dict of that architecture? {how_to_save(arch, path)}"
        ) from None


class PretrainedImageEncoder(ContextEncoder):
    """A torchvision VGG / ResNet on the image modality (module docstring).

    Args:
        arch: torchvision model name (`ARCHS`): ``vgg16`` (fc7, 4,096), ``resnet152`` (pooled, 2,048), ...
        weights: a local ``.pth`` file holding that model's ``state_dict()``; never downloaded.
        output: ``pooled`` (B, output_dim).
        freeze: ``none`` | ``all`` | ``features``.
        random_init: build without loading ``weights`` (tests, training from scratch).
        proj_dim: optional linear projection of the pooled features (DEQ's ResNet-152: 768).
    """

    def __init__(
        self,
        arch: str = "vgg16",
        weights: str | None = None,
        output: str = "pooled",
        freeze: str = "none",
        random_init: bool = False,
        proj_dim: int | None = None,
    ) -> None:
        super().__init__()
        check_choices(
            "backbone.image", {"arch": (arch, ARCHS), "output": (output, OUTPUTS), "freeze": (freeze, FREEZE)}
        )
        import torchvision

        self.arch, self.output, self.freeze = arch, output, freeze
        if not random_init:
            if weights is None or not str(weights).strip():
                raise ConfigError(
                    "backbone.image.weights is empty: give the local file of the pretrained state dict or "
                    "set "
                    f"`backbone.image.random_init=true`. {how_to_save(arch, f'{arch}.pth')}"
                )
            if not Path(weights).expanduser().is_file():  # before building: a large model takes seconds
                raise ConfigError(
                    f"backbone.image.weights={weights} does not exist. {how_to_save(arch, weights)}"
                )
        model = torchvision.models.get_model(arch, weights=None)
        if not random_init:
            load_state_dict(model, arch, weights)
        self.weights = None if random_init else str(weights)
        if arch in VGG:
            # fc6 -> ReLU -> Dropout -> fc7 -> ReLU: gmu-mmimdb's fc_15 output (the last hidden layer)
            self.body = nn.Sequential(model.features, model.avgpool, nn.Flatten(1), *model.classifier[:5])
            features = model.features
            self.width = int(model.classifier[3].out_features)
        else:
            stem = [
                model.conv1,
                model.bn1,
                model.relu,
                model.maxpool,
                model.layer1,
                model.layer2,
                model.layer3,
            ]
            self.body = nn.Sequential(*stem, model.layer4, model.avgpool, nn.Flatten(1))
            features = nn.Sequential(*stem)  # not registered: its modules are the body's
            self.width = int(model.fc.in_features)
        self.proj = nn.Linear(self.width, int(proj_dim)) if proj_dim else None
        self.output_dim = int(proj_dim or self.width)
        frozen = {"none": None, "all": self.body, "features": features}[freeze]
        self._frozen_bn: list[nn.Module] = []
        if frozen is not None:
            for p in frozen.parameters():
                p.requires_grad_(False)
            self._frozen_bn = [m for m in frozen.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def train(self, mode: bool = True) -> PretrainedImageEncoder:
        super().train(mode)
        for m in self._frozen_bn:  # frozen BatchNorm keeps its pretrained running statistics
            m.eval()
        return self

    # -- Pro-Fusion ----------------------------------------------------------------------------
    def join_widths(self) -> list[int]:
        return [self.width]

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"an image modality is (batch, 3, height, width); got shape {tuple(x.shape)}")
        h = self.join(0, self.body(x), context)
        return h if self.proj is None else self.proj(h)
