"""How the model runs on the device: bf16 autocast, channels_last, torch.compile.

Only the network's forward runs in bf16 (autocast keeps its reductions, e.g. BatchNorm and the
L2 norm, in float32); the features it hands to the AND loss are float32, and the memory bank, the
loss normaliser and the optimizer state stay float32. `train.precision=auto` is bf16
on CUDA (tensor cores) and float32 on CPU, where bf16 is slower and only adds rounding.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


def resolve_precision(precision: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """auto -> bf16 on CUDA, fp32 elsewhere and for float64 runs (bit-stable checks)."""
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" and dtype == torch.float32 else "fp32"
    return precision


def autocast(precision: str, device: torch.device):
    """The forward's context: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def use_channels_last(model: nn.Module, device: torch.device) -> bool:
    """NHWC suits cuDNN's tensor-core convolutions; on CPU it only costs conversions."""
    return torch.device(device).type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules())


class DeviceForward(nn.Module):
    """Wraps the (possibly DDP) network: inputs to channels_last, forward under autocast,
    features back to float32. State dicts and checkpoints keep using the inner model."""

    def __init__(self, net: nn.Module, precision: str, channels_last: bool, device: torch.device):
        super().__init__()
        self.net, self.precision, self.channels_last, self.device = net, precision, channels_last, device

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(self.precision, self.device):
            feats = self.net(images)
        return feats.float() if self.precision == "bf16" else feats


def set_layout(model: nn.Module, device: torch.device) -> bool:
    """channels_last in place for CUDA conv nets; call before DDP wraps the model (its gradient
    buckets follow the parameters' layout). Returns whether inputs should be channels_last."""
    last = use_channels_last(model, device)
    if last:
        model.to(memory_format=torch.channels_last)
    return last


def wrap(net: nn.Module, device: torch.device, precision: str, channels_last: bool,
         compile_model: bool = False, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The trainer's forward for `net` (the model or its DDP wrapper), compiled if asked."""
    forward = DeviceForward(net, resolve_precision(precision, device, dtype), channels_last, torch.device(device))
    # static shapes: the last, smaller batch gets its own graph instead of turning the
    # steady-state one dynamic
    return torch.compile(forward, dynamic=False) if compile_model else forward
