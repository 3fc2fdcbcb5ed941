"""Checkpoints that do not depend on the world size.

A checkpoint is a directory: `state.pt` (model, optimizer, discovery state, position, RNG,
config; written by rank 0) plus one `bank-<rank>.pt` per rank holding its slice with its global
index range. Any world size can load it: each rank copies the parts of the saved slices that
fall in its own range, so no rank ever holds the whole bank. The directory is written under a
temporary name and renamed, then `latest` is replaced atomically, so a crash mid-write never
leaves a checkpoint that looks complete.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from . import dist
from .bank import ShardedBank

LATEST = "latest"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(ckpt_root: Path, name: str, state: dict, bank: ShardedBank, keep: int = 2) -> Path:
    """Collective: every rank writes its bank slice, rank 0 the rest, then publishes it."""
    rank, _ = dist.rank_world()
    final, tmp = ckpt_root / name, ckpt_root / f".tmp-{name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    torch.save(bank.state_dict(), tmp / f"bank-{rank}.pt")
    if rank == 0:
        torch.save(state, tmp / "state.pt")
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _atomic_write_text(ckpt_root / LATEST, name)
        _prune(ckpt_root, keep)
    dist.barrier()
    return final


def _prune(ckpt_root: Path, keep: int) -> None:
    """Keep the `keep` newest checkpoints (by modification time) and the one `latest` names."""
    latest = (ckpt_root / LATEST).read_text().strip()
    dirs = sorted((d for d in ckpt_root.iterdir() if d.is_dir() and not d.name.startswith(".")),
                  key=lambda d: d.stat().st_mtime, reverse=True)
    for d in dirs[max(keep, 1):]:
        if d.name != latest:
            shutil.rmtree(d, ignore_errors=True)


def find_latest(ckpt_root: Path) -> Path | None:
    marker = ckpt_root / LATEST
    if not marker.exists():
        return None
    path = ckpt_root / marker.read_text().strip()
    return path if (path / "state.pt").exists() else None


def load(path: Path, bank: ShardedBank) -> dict:
    """Fill this rank's bank slice from the saved slices and return the shared state."""
    for f in sorted(path.glob("bank-*.pt")):
        part = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        if part["n"] != bank.n:
            raise ValueError(f"checkpoint {path} has a bank of {part['n']} rows, this data set {bank.n}")
        bank.load_rows(part["lo"], part["rows"])
    return torch.load(path / "state.pt", map_location="cpu", weights_only=True)
