"""Atomic file writes: a reader (or a crash) never sees a half-written file."""
from __future__ import annotations

import os
from pathlib import Path

import torch


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = _tmp(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def torch_save(obj, path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = _tmp(path)
    torch.save(obj, tmp)
    os.replace(tmp, path)
