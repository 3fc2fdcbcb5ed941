"""Rebuild a trained model from a run directory or checkpoint, without a bank or an optimizer."""
from __future__ import annotations

from pathlib import Path

import torch

from ..run import checkpoint
from ..config import Config, config_from_dict
from ..models import build_model


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, Config, Path]:
    """(model in eval mode, the run's config, the checkpoint directory) from a checkpoint directory
    (e.g. RUN/checkpoints/latest) or a run directory."""
    ckpt = checkpoint.resolve(Path(path))
    state = checkpoint.read_state(ckpt)
    cfg = config_from_dict(state["config"]["config"])
    model = build_model(cfg.model.arch, cfg.model.low_dim, cfg.data.image_size)
    weights = {k.removeprefix("module."): v for k, v in state["model"].items()}
    model.load_state_dict(weights)
    return model.to(device).eval(), cfg, ckpt
