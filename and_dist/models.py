"""Backbones and the L2-normalised embedding head used by AND.

All architectures are written here (torchvision is not importable on the
target machines).  The ImageNet ResNets keep torchvision's module names so
state dicts interchange with torchvision checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ARCHS", "EmbeddingNet", "build_model", "AlexNetBN"]


# --------------------------------------------------------------------------- #
# ResNet (ImageNet v1.5 and the CIFAR variant)
# --------------------------------------------------------------------------- #


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: the stride sits on the 3x3 conv, not the first 1x1."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetTrunk(nn.Module):
    """ResNet without the classifier; returns the pooled feature vector.

    ``cifar=True`` swaps the 7x7/s2 stem + max-pool for a 3x3/s1 stem and no
    pool, as in the Instance Discrimination / AND CIFAR experiments, so 32x32
    inputs are not downsampled 4x before the first stage.
    """

    def __init__(self, block: type, layers: list[int], cifar: bool = False):
        super().__init__()
        self.inplanes = 64
        if cifar:
            self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if cifar else nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feat_dim = 512 * block.expansion
        _init_weights(self)

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        mods = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        mods += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, relu) convs and unit/zero norms, as torchvision ResNets."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- #
# AlexNet with BatchNorm (Wu et al. 2018 / AND ImageNet)
# --------------------------------------------------------------------------- #


def _conv_bn_relu(cin: int, cout: int, k: int, stride: int = 1, pad: int = 0, pool: bool = False) -> nn.Sequential:
    # Conv bias is dropped: the following BN has its own shift.
    mods = [nn.Conv2d(cin, cout, k, stride=stride, padding=pad, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    if pool:
        mods.append(nn.MaxPool2d(3, stride=2))
    return nn.Sequential(*mods)


class AlexNetBN(nn.Module):
    """AlexNet-BN trunk (224x224 input -> 4096-d fc7).

    The conv blocks are separate attributes so ``conv_features`` can feed the
    per-layer linear probes.
    """

    def __init__(self):
        super().__init__()
        self.conv1 = _conv_bn_relu(3, 96, 11, stride=4, pad=2, pool=True)
        self.conv2 = _conv_bn_relu(96, 256, 5, pad=2, pool=True)
        self.conv3 = _conv_bn_relu(256, 384, 3, pad=1)
        self.conv4 = _conv_bn_relu(384, 384, 3, pad=1)
        self.conv5 = _conv_bn_relu(384, 256, 3, pad=1, pool=True)
        self.fc6 = nn.Sequential(nn.Linear(256 * 6 * 6, 4096, bias=False), nn.BatchNorm1d(4096), nn.ReLU(inplace=True))
        self.fc7 = nn.Sequential(nn.Linear(4096, 4096, bias=False), nn.BatchNorm1d(4096), nn.ReLU(inplace=True))
        self.feat_dim = 4096
        _init_weights(self)

    def conv_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Activation after each conv block, keyed "conv1".."conv5"."""
        feats = {}
        for name in ("conv1", "conv2", "conv3", "conv4", "conv5"):
            x = getattr(self, name)(x)
            feats[name] = x
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5):
            x = block(x)
        return self.fc7(self.fc6(torch.flatten(x, 1)))


# --------------------------------------------------------------------------- #
# Small CNNs for the CPU demo and the distributed-equivalence tests
# --------------------------------------------------------------------------- #


class SmallConvNet(nn.Module):
    """Four 3x3 conv layers + global average pool; fast enough for a 2-core CPU demo.

    ``norm="group"`` uses GroupNorm so a sample's output does not depend on
    the rest of the batch -- needed to check that N-rank training equals
    single-process training exactly.

    Weights and activations are channels-last: on CPU (oneDNN) this cuts a
    forward+backward of 128x3x32x32 from ~75 ms to ~50 ms on 2 cores, since
    the elementwise BN/ReLU/pool passes, not the convs, dominate at this size.
    """

    widths = (32, 64, 128, 128)

    def __init__(self, norm: str = "batch"):
        super().__init__()

        def norm_layer(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if norm == "batch" else nn.GroupNorm(8, c)

        c1, c2, c3, c4 = self.widths
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1, bias=False), norm_layer(c1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False), norm_layer(c2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1, bias=False), norm_layer(c3), nn.ReLU(inplace=True),
            nn.Conv2d(c3, c4, 3, padding=1, bias=False), norm_layer(c4), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
        )  # fmt: skip
        self.feat_dim = c4
        _init_weights(self)
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        return torch.flatten(self.features(x), 1)


# --------------------------------------------------------------------------- #
# Embedding wrapper and factory
# --------------------------------------------------------------------------- #


class EmbeddingNet(nn.Module):
    """Trunk + linear head, output L2-normalised (AND compares embeddings by cosine)."""

    def __init__(self, backbone: nn.Module, feat_dim: int, low_dim: int = 128):
        super().__init__()
        self.backbone = backbone
        self.feat_dim = feat_dim
        self.head = nn.Linear(feat_dim, low_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(x)), dim=1)


_BUILDERS = {
    "resnet18_cifar": lambda: ResNetTrunk(BasicBlock, [2, 2, 2, 2], cifar=True),
    "resnet18": lambda: ResNetTrunk(BasicBlock, [2, 2, 2, 2]),
    "resnet50": lambda: ResNetTrunk(Bottleneck, [3, 4, 6, 3]),
    "alexnet_bn": AlexNetBN,
    "convnet_small": lambda: SmallConvNet("batch"),
    "convnet_gn": lambda: SmallConvNet("group"),
}
ARCHS = tuple(_BUILDERS)


def build_model(arch: str, low_dim: int = 128) -> EmbeddingNet:
    """Build ``EmbeddingNet`` for ``arch`` (one of ``ARCHS``)."""
    if arch not in _BUILDERS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    backbone = _BUILDERS[arch]()
    return EmbeddingNet(backbone, backbone.feat_dim, low_dim)

