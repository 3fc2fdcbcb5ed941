"""Embeddings of any stream of preprocessed image batches with any model (eval mode, no grad)."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn


@torch.no_grad()
def extract(model: nn.Module, batches: Iterable[torch.Tensor], dtype: torch.dtype = torch.float32,
            progress: Callable[[int], None] | None = None, dim: int | None = None,
            autocast: bool = False) -> torch.Tensor:
    """Concatenated model outputs; `dim` shapes the empty result when there are no batches.
    The model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    out, device = [], next(model.parameters()).device
    for x in batches:
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            out.append(model(x.to(device, dtype)).float())
        if progress is not None:
            progress(len(x))
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dim or 0, device=device)
