"""The backbones: `ARCHS` (the config's choices) here, the models and `build_model` in their
modules, loaded with torch on first use, so the config and the launcher read ARCHS without torch.

All architectures are written here: torchvision is pinned for GPU clusters but never imported
(its CPU-machine wheel is a CUDA build that cannot load next to CPU torch)."""
from __future__ import annotations

import importlib

ARCHS = ("resnet18_cifar", "resnet18", "resnet50", "alexnet_bn", "alexnet", "convnet_small", "convnet_gn")
_HOME = {"EmbeddingNet": "build", "build_model": "build", "AlexNetBN": "alexnet",
         "GlobalBatchNorm": "global_bn", "convert_global_bn": "global_bn"}
__all__ = ["ARCHS", *_HOME]


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
