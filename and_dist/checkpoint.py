"""Checkpoints of named state owners, loadable at any world size.

An owner is anything with `state_dict()` / `load_state_dict()`. A checkpoint is a directory:
`state.pt` holds every replicated owner's state (written by rank 0); an owner marked `sharded`
(the memory bank) is saved by every rank as `<name>-<rank>.pt` and, on loading, is handed all the
saved parts so it can take what falls in its own range. The directory is written under a
temporary name and renamed, then `latest` is replaced atomically, so a crash mid-write never
leaves a checkpoint that looks complete. This module knows nothing of any one owner.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from . import dist, files

LATEST = "latest"
STATE = "state.pt"


def save(ckpt_root: Path, name: str, owners: dict, keep: int = 2) -> Path:
    """Collective: every rank writes its sharded owners, rank 0 the rest, then publishes."""
    rank, _ = dist.rank_world()
    final, tmp = ckpt_root / name, ckpt_root / f".tmp-{name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    replicated = {}
    for key, owner in owners.items():
        if getattr(owner, "sharded", False):
            torch.save(owner.state_dict(), tmp / f"{key}-{rank}.pt")
        elif rank == 0:
            replicated[key] = owner.state_dict()
    if rank == 0:
        torch.save(replicated, tmp / STATE)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        files.write_text(ckpt_root / LATEST, name)
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
    return path if (path / STATE).exists() else None


def resolve(path: Path) -> Path:
    """A checkpoint directory from itself, its `checkpoints/` folder or its run directory."""
    path = Path(path).expanduser()
    for candidate in (path, path / "checkpoints"):
        if (candidate / STATE).exists():
            return candidate
        latest = find_latest(candidate)
        if latest is not None:
            return latest
    raise FileNotFoundError(f"no checkpoint at {path} (expected a checkpoint directory or a run directory)")


def read_state(path: Path) -> dict:
    """The replicated owners' states of a checkpoint, by owner name."""
    return torch.load(path / STATE, map_location="cpu", weights_only=True)


def load(path: Path, owners: dict) -> None:
    """Restore every owner that the checkpoint holds; owners it lacks keep their state."""
    state = read_state(path)
    for key, owner in owners.items():
        if getattr(owner, "sharded", False):
            parts = (torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                     for f in sorted(path.glob(f"{key}-*.pt")))
            owner.load_state_dict(parts)
        elif key in state:
            owner.load_state_dict(state[key])
