"""Weight initialisation shared by the backbones."""
from __future__ import annotations

import torch.nn as nn

def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, relu) convs and unit/zero norms, as torchvision ResNets."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
