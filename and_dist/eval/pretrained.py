"""Rebuild a trained model from a run directory or checkpoint, without a bank or an optimizer; and
what a PATH to trained weights names (a run, a checkpoint, a run name or a weights file)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..platform.errors import UserError
from ..run import checkpoint, rundir
from ..run.contents import RunState
from ..config import Config
from ..models import build_model


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, Config, Path]:
    """(model in eval mode, the run's config, the checkpoint directory) from a checkpoint directory
    (e.g. RUN/checkpoints/latest) or a run directory."""
    ckpt = checkpoint.resolve(Path(path))
    saved = RunState(ckpt)
    cfg = saved.config()
    model = build_model(cfg.model.arch, cfg.model.low_dim, cfg.data.image_size)
    model.load_state_dict(saved.weights)
    return model.to(device).eval(), cfg, ckpt


def resolve_trained(text: str, flag: str = "--checkpoint") -> tuple[Path | None, Path | None, str]:
    """(checkpoint directory, weights file, what was chosen) for `evaluate --checkpoint PATH`,
    `export` and `init_from=PATH` (`flag` names it in the errors)."""
    path = Path(text).expanduser().absolute()
    if path.is_file():
        if path.name == checkpoint.LATEST:
            path = path.parent / path.read_text().strip()
        else:
            return None, path, f"weights file {path}"
    if not path.exists():
        raise UserError(f"{flag} {path} does not exist: no checkpoint or weights file there")
    try:
        ckpt = checkpoint.resolve(path)
        return ckpt, None, f"checkpoint {ckpt}"
    except FileNotFoundError:
        pass
    runs = rundir.runs_of(path)
    for run in reversed(runs):           # the newest run, as resume=auto picks it
        latest = checkpoint.find_latest(run / "checkpoints")
        if latest is not None:
            return latest, None, f"run name {path}: its newest run {run.name} ({len(runs)} in all), checkpoint {latest}"
        break
    raise UserError(f"{flag} {path}: no checkpoint there (expected a run directory, a checkpoint "
                    "directory, a run-name directory holding runs, or a weights file)")
