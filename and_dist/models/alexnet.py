"""AlexNet with BatchNorm, as in the Instance Discrimination / AND ImageNet experiments: five conv
layers (BN, no conv bias), fc6/fc7 of 4096. Each conv block ends at its ReLU and the max-pools are
separate modules, so a probe tapping `backbone.convK` reads the activation after the ReLU and
before the pool (224 px: conv1 96x55x55, conv2 256x27x27, conv3/conv4 384x13x13, conv5 256x13x13)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..platform.errors import UserError
from .init import init_weights



def _conv_bn_relu(cin: int, cout: int, k: int, stride: int = 1, pad: int = 0) -> nn.Sequential:
    # Conv bias is dropped: the following BN has its own shift.
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride=stride, padding=pad, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _pooled(size: int) -> int:
    return (size - 3) // 2 + 1


def conv5_size(image_size: int) -> int:
    """Spatial size after pool5 for a square input (6 at 224 px)."""
    s = (image_size + 2 * 2 - 11) // 4 + 1
    return _pooled(_pooled(_pooled(s))) if s >= 3 else 0


class AlexNetBN(nn.Module):
    """AlexNet-BN trunk, image_size x image_size input -> 4096-d fc7."""

    def __init__(self, image_size: int = 224):
        super().__init__()
        side = conv5_size(image_size)
        if side < 1:
            raise UserError(f"model.arch=alexnet_bn needs images of at least 63 px; got data.image_size={image_size}")
        self.conv1 = _conv_bn_relu(3, 96, 11, stride=4, pad=2)
        self.pool1 = nn.MaxPool2d(3, stride=2)
        self.conv2 = _conv_bn_relu(96, 256, 5, pad=2)
        self.pool2 = nn.MaxPool2d(3, stride=2)
        self.conv3 = _conv_bn_relu(256, 384, 3, pad=1)
        self.conv4 = _conv_bn_relu(384, 384, 3, pad=1)
        self.conv5 = _conv_bn_relu(384, 256, 3, pad=1)
        self.pool5 = nn.MaxPool2d(3, stride=2)
        self.fc6 = nn.Sequential(nn.Linear(256 * side * side, 4096, bias=False), nn.BatchNorm1d(4096), nn.ReLU(inplace=True))
        self.fc7 = nn.Sequential(nn.Linear(4096, 4096, bias=False), nn.BatchNorm1d(4096), nn.ReLU(inplace=True))
        self.feat_dim = 4096
        init_weights(self)

    def conv_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each conv layer's activation after its ReLU, before its pool, keyed "conv1".."conv5"."""
        feats = {}
        x = feats["conv1"] = self.conv1(x)
        x = feats["conv2"] = self.conv2(self.pool1(x))
        x = feats["conv3"] = self.conv3(self.pool2(x))
        x = feats["conv4"] = self.conv4(x)
        feats["conv5"] = self.conv5(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool2(self.conv2(self.pool1(self.conv1(x))))
        x = self.pool5(self.conv5(self.conv4(self.conv3(x))))
        return self.fc7(self.fc6(torch.flatten(x, 1)))
