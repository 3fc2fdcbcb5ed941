"""AlexNet in torchvision's layout (no batch norm, conv biases, dropout; module names `features.N`
and `classifier.N`), so torchvision's `alexnet` weights load by name. The trunk stops after fc7's
ReLU: torchvision's last layer, `classifier.6`, is the head (EmbeddingNet's `head`)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..platform.errors import UserError
from .alexnet import conv5_size


class TorchvisionAlexNet(nn.Module):
    """image_size x image_size input (at least 63 px) -> 4096-d fc7 after its ReLU."""

    def __init__(self, image_size: int = 224):
        super().__init__()
        if conv5_size(image_size) < 1:
            raise UserError(f"model.arch=alexnet needs images of at least 63 px; got data.image_size={image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2),
        )  # fmt: skip
        self.avgpool = nn.AdaptiveAvgPool2d(6)
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
            nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(inplace=True),
        )  # fmt: skip
        self.feat_dim = 4096

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))
