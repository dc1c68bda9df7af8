"""Model zoo shared by the tests, the examples and the benchmarks.

Every model is defined here once, so that all three adapters (dpm_depgraph, dpm_otov2,
dpm_gatedecorator), their tests and ``dpm-bench`` prune exactly the same architectures.

CIFAR-style models (32x32 inputs; they also accept other sizes):

* ``resnet20`` / ``resnet56``: the CIFAR ResNet of He et al. (2016), BasicBlocks, stage widths
  16/32/64, 3 stages of (depth-2)/6 blocks. When a block changes the shape, its shortcut is a
  1x1 conv + BN ("option B"), not the parameter-free zero-padding shortcut ("option A"), so
  that Torch-Pruning's DependencyGraph can trace the residual coupling. ResNet-56 has ~0.855M
  parameters (option A: 0.853M).
* ``vgg16``: CIFAR VGG-16 without BatchNorm; 13 conv layers then an MLP head
  512 -> 512 -> num_classes (the OTOv2-style classifier).
* ``vgg16_bn`` / ``vgg19_bn``: CIFAR VGG with BatchNorm after every conv, then
  Flatten -> Linear(512, num_classes).
* ``small_cnn``: 3 conv+BN+ReLU layers, global average pool, Linear. For fast tests.
* ``flatten_linear_cnn``: convs, then an AdaptiveAvgPool2d(4) and ``nn.Flatten`` over the
  4x4 map into a Linear, so that one conv channel owns 16 input columns of that Linear
  (exercises the channel -> many columns index mapping).

ImageNet-sized:

* ``resnet50``: torchvision's ResNet-50 (random init). With ``width != 1`` the same module
  structure and names are built with thinner stages (``conv1``/stem width and every stage are
  scaled), for fast tests.

Use :func:`get_model` to build any of them by name::

    from benchmarks.models import get_model
    model = get_model("resnet56", num_classes=10)
    thin = get_model("vgg16_bn", num_classes=100, width=0.25)

``width`` multiplies every hidden channel count (at least 1 channel is kept);
``in_channels`` sets the number of input image channels (3 for RGB, 1 for grey images).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import Bottleneck as _Bottleneck
from torchvision.models.resnet import ResNet as _TVResNet

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "VGG",
    "SmallCNN",
    "FlattenLinearCNN",
    "resnet20",
    "resnet56",
    "cifar_resnet",
    "vgg16",
    "vgg16_bn",
    "vgg19_bn",
    "resnet50",
    "small_cnn",
    "flatten_linear_cnn",
    "get_model",
    "MODEL_NAMES",
    "default_input_size",
    "example_inputs",
]


def _scale(c: int, width: float) -> int:
    """Scale a channel count by ``width``, keeping at least one channel."""
    return max(1, int(round(c * width)))


def _check_common(num_classes: int, in_channels: int, width: float) -> None:
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int (3 for RGB, 1 for grey), got {in_channels!r}")
    if not isinstance(width, (int, float)) or not width > 0:
        raise ValueError(f"width must be a positive number (1.0 = the standard model), got {width!r}")


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------
# CIFAR ResNet
# ----------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """3x3 conv-BN-ReLU, 3x3 conv-BN, plus identity or 1x1 conv+BN (option B) shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2): stem conv 3x3 (16), 3 stages of n BasicBlocks (16, 32, 64), GAP, FC."""

    def __init__(self, depth: int = 56, num_classes: int = 10, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        _check_common(num_classes, in_channels, width)
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        widths = [_scale(16, width), _scale(32, width), _scale(64, width)]
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.in_planes = widths[0]
        self.layer1 = self._make_layer(widths[0], n, stride=1)
        self.layer2 = self._make_layer(widths[1], n, stride=2)
        self.layer3 = self._make_layer(widths[2], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        _init_weights(self)
        # The usual CIFAR ResNet init of the classifier (PyTorch default) trains faster than N(0, .01).
        nn.init.kaiming_uniform_(self.fc.weight, a=5 ** 0.5)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.flatten(self.avgpool(out), 1)
        return self.fc(out)


def cifar_resnet(depth: int, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> CifarResNet:
    """CIFAR ResNet of any depth 6n+2."""
    return CifarResNet(depth, num_classes, in_channels, width)


def resnet20(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> CifarResNet:
    """CIFAR ResNet-20 (~0.27M parameters)."""
    return CifarResNet(20, num_classes, in_channels, width)


def resnet56(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> CifarResNet:
    """CIFAR ResNet-56 (~0.855M parameters)."""
    return CifarResNet(56, num_classes, in_channels, width)


# ----------------------------------------------------------------------------------------------
# CIFAR VGG
# ----------------------------------------------------------------------------------------------
_VGG_CFG: Dict[str, List[Union[int, str]]] = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """CIFAR VGG: ``features`` (conv3x3 [+BN] + ReLU, max-pools), global pool to 1x1, classifier.

    ``head="linear"``: Flatten -> Linear(C, num_classes).
    ``head="mlp"``: Flatten -> Linear(C, C) -> ReLU -> Linear(C, num_classes) (OTOv2 style).
    The AdaptiveAvgPool2d(1) before the head is a no-op for 32x32 inputs (5 max-pools give 1x1)
    and lets other input sizes (e.g. 8x8 digits) work.
    """

    def __init__(self, cfg: Sequence[Union[int, str]], batch_norm: bool, num_classes: int = 10,
                 in_channels: int = 3, width: float = 1.0, head: str = "linear"):
        super().__init__()
        _check_common(num_classes, in_channels, width)
        if head not in ("linear", "mlp"):
            raise ValueError(f"VGG head must be 'linear' or 'mlp', got {head!r}")
        layers: List[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
                continue
            out = _scale(int(v), width)
            layers.append(nn.Conv2d(c, out, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU(inplace=True))
            c = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        if head == "linear":
            self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c, num_classes))
        else:
            self.classifier = nn.Sequential(
                nn.Flatten(), nn.Linear(c, c), nn.ReLU(inplace=True), nn.Linear(c, num_classes)
            )
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


def vgg16(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, head: str = "mlp") -> VGG:
    """CIFAR VGG-16 without BatchNorm (conv biases on), MLP head 512->512->num_classes."""
    return VGG(_VGG_CFG["vgg16"], False, num_classes, in_channels, width, head)


def vgg16_bn(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, head: str = "linear") -> VGG:
    """CIFAR VGG-16 with BatchNorm, Flatten -> Linear(512, num_classes)."""
    return VGG(_VGG_CFG["vgg16"], True, num_classes, in_channels, width, head)


def vgg19_bn(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, head: str = "linear") -> VGG:
    """CIFAR VGG-19 with BatchNorm, Flatten -> Linear(512, num_classes)."""
    return VGG(_VGG_CFG["vgg19"], True, num_classes, in_channels, width, head)


# ----------------------------------------------------------------------------------------------
# Small test models
# ----------------------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    """conv(16)-BN-ReLU, conv(32, stride 2)-BN-ReLU, conv(64, stride 2)-BN-ReLU, GAP, Linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        _check_common(num_classes, in_channels, width)
        c1, c2, c3 = _scale(16, width), _scale(32, width), _scale(64, width)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(inplace=True),
            nn.Conv2d(c2, c3, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c3), nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c3, num_classes)
        _init_weights(self)
        nn.init.kaiming_uniform_(self.fc.weight, a=5 ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class FlattenLinearCNN(nn.Module):
    """Convs, AdaptiveAvgPool2d(4), ``nn.Flatten`` over the 4x4 map, Linear(C*16, hidden), ReLU,
    Linear(hidden, num_classes). Conv channel c of the last conv owns Linear columns
    ``c*16 .. c*16+15`` of ``classifier[1]``."""

    spatial = 4

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0, hidden: int = 64):
        super().__init__()
        _check_common(num_classes, in_channels, width)
        c1, c2 = _scale(16, width), _scale(32, width)
        h = _scale(hidden, width)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(self.spatial),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * self.spatial * self.spatial, h),
            nn.ReLU(inplace=True),
            nn.Linear(h, num_classes),
        )
        _init_weights(self)
        for m in self.classifier:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_uniform_(m.weight, a=5 ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def small_cnn(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> SmallCNN:
    """Tiny 3-conv CNN with BatchNorm (fast tests)."""
    return SmallCNN(num_classes, in_channels, width)


def flatten_linear_cnn(num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                       hidden: int = 64) -> FlattenLinearCNN:
    """2 convs, then Flatten over a 4x4 map into a Linear (one channel -> 16 Linear columns)."""
    return FlattenLinearCNN(num_classes, in_channels, width, hidden)


# ----------------------------------------------------------------------------------------------
# ImageNet ResNet-50 (torchvision)
# ----------------------------------------------------------------------------------------------
def resnet50(num_classes: int = 1000, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """torchvision ResNet-50 (random init). ``width != 1`` builds the same structure (same module
    names: conv1, bn1, layer1..4, fc) with every stage width scaled, using torchvision's
    Bottleneck and ``ResNet._make_layer``. ``in_channels != 3`` replaces the stem conv."""
    import torchvision

    _check_common(num_classes, in_channels, width)
    if width == 1.0:
        model = torchvision.models.resnet50(weights=None, num_classes=num_classes)
    else:
        model = _ThinResNet50(num_classes, width)
    if in_channels != 3:
        old = model.conv1
        model.conv1 = nn.Conv2d(in_channels, old.out_channels, 7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


class ThinResNet50(_TVResNet):
    """torchvision ResNet-50 layout with stage widths scaled by ``width``.

    Defined at module level so that pickling the whole model works (only-train-once's
    ``construct_subnet`` saves the model object itself).
    """

    def __init__(self, num_classes: int, width: float):
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
        self.inplanes = _scale(64, width)
        self.conv1 = nn.Conv2d(3, self.inplanes, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(_Bottleneck, _scale(64, width), 3)
        self.layer2 = self._make_layer(_Bottleneck, _scale(128, width), 4, stride=2)
        self.layer3 = self._make_layer(_Bottleneck, _scale(256, width), 6, stride=2)
        self.layer4 = self._make_layer(_Bottleneck, _scale(512, width), 3, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(_scale(512, width) * _Bottleneck.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def _ThinResNet50(num_classes: int, width: float) -> nn.Module:
    return ThinResNet50(num_classes, width)


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------
_REGISTRY: Dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet56": resnet56,
    "vgg16": vgg16,
    "vgg16_bn": vgg16_bn,
    "vgg19_bn": vgg19_bn,
    "resnet50": resnet50,
    "small_cnn": small_cnn,
    "flatten_linear_cnn": flatten_linear_cnn,
}

#: Names accepted by :func:`get_model`, in a stable order.
MODEL_NAMES: Tuple[str, ...] = tuple(_REGISTRY)

_ALIASES = {
    "resnet-20": "resnet20", "resnet-56": "resnet56", "resnet-50": "resnet50",
    "vgg-16": "vgg16", "vgg16bn": "vgg16_bn", "vgg16-bn": "vgg16_bn",
    "vgg19bn": "vgg19_bn", "vgg19-bn": "vgg19_bn", "vgg19": "vgg19_bn",
    "smallcnn": "small_cnn", "small-cnn": "small_cnn",
    "flatten-linear-cnn": "flatten_linear_cnn",
}


def _canonical(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}"
        )
    return key


def get_model(name: str, num_classes: int = 10, in_channels: int = 3, width: float = 1.0, **kwargs) -> nn.Module:
    """Build a model by name (see :data:`MODEL_NAMES`).

    ``num_classes``: classifier outputs. ``in_channels``: input image channels.
    ``width``: multiplier on every hidden channel count (``0.25`` gives a thin, fast model).
    Extra keyword arguments go to the model's builder (e.g. ``head="mlp"`` for VGGs).
    Raises ``ValueError`` listing the known names for an unknown one.
    """
    return _REGISTRY[_canonical(name)](num_classes=num_classes, in_channels=in_channels, width=width, **kwargs)


def default_input_size(name: str) -> int:
    """Natural input side length for a model: 224 for ``resnet50``, else 32 (CIFAR)."""
    return 224 if _canonical(name) == "resnet50" else 32


def example_inputs(name: str, in_channels: int = 3, batch: int = 1, size: int = None) -> torch.Tensor:
    """A random input batch of the model's natural size, e.g. for DependencyGraph tracing."""
    s = size or default_input_size(name)
    return torch.randn(batch, in_channels, s, s)
