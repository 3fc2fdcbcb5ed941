"""Each architecture's builder and the L2-normalised embedding head every backbone ends in."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ARCHS
from .alexnet import AlexNetBN
from .alexnet_tv import TorchvisionAlexNet
from .convnet import SmallConvNet
from .resnet import BasicBlock, Bottleneck, ResNetTrunk

class EmbeddingNet(nn.Module):
    """Trunk + linear head, output L2-normalised (AND compares embeddings by cosine)."""

    def __init__(self, backbone: nn.Module, feat_dim: int, low_dim: int = 128):
        super().__init__()
        self.backbone = backbone
        self.feat_dim = feat_dim
        self.head = nn.Linear(feat_dim, low_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(x)), dim=1)


_BUILDERS = {  # name -> (image_size -> backbone)
    "resnet18_cifar": lambda size: ResNetTrunk(BasicBlock, [2, 2, 2, 2], cifar=True),
    "resnet18": lambda size: ResNetTrunk(BasicBlock, [2, 2, 2, 2]),
    "resnet50": lambda size: ResNetTrunk(Bottleneck, [3, 4, 6, 3]),
    "alexnet_bn": lambda size: AlexNetBN(size),
    "alexnet": lambda size: TorchvisionAlexNet(size),   # torchvision's layout, no batch norm
    "convnet_small": lambda size: SmallConvNet("batch"),
    "convnet_gn": lambda size: SmallConvNet("group"),
}
assert tuple(_BUILDERS) == ARCHS, "models/__init__.py's ARCHS names every builder, in order"


def build_model(arch: str, low_dim: int = 128, image_size: int = 224) -> EmbeddingNet:
    """Build ``EmbeddingNet`` for ``arch`` (one of ``ARCHS``) and square inputs of ``image_size``."""
    if arch not in _BUILDERS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    backbone = _BUILDERS[arch](image_size)
    return EmbeddingNet(backbone, backbone.feat_dim, low_dim)
