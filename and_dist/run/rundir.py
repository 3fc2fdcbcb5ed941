"""Run directories: a fresh run never touches another run's files.

A fresh run gets a new `out_dir/name/<YYYYmmdd-HHMMSS>` folder (a suffix -2, -3 ... if two start
in the same second); `resume=auto` continues the newest run of that name; `run_dir=PATH` is used
as given (a fresh run refuses a directory that already holds a run). A lock file names the
process that writes a run; a second process is refused while the holder lives.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from ..platform.errors import UserError

LOCK = ".lock"
MARKER = "config.yaml"      # a directory holding this holds a run


def _holds_run(path: Path) -> bool:
    return (path / MARKER).exists() or (path / "checkpoints").exists()


def runs_of(parent: Path) -> list[Path]:
    """The runs under out_dir/name, oldest first (names are creation timestamps)."""
    if not parent.is_dir():
        return []
    def created(d: Path):
        stamp, _, n = d.name[:15], d.name[15:16], d.name[16:]
        return (stamp, int(n) if n.isdigit() else 1)
    return sorted((d for d in parent.iterdir() if d.is_dir() and not d.name.startswith(".") and _holds_run(d)),
                  key=created)


def _new_dir(parent: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        path = parent / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise UserError(f"cannot create a new run directory under {parent}")


def choose(out_dir: str, name: str, run_dir: str, resume: str) -> tuple[Path, bool]:
    """(the run directory, whether it continues an earlier run). Rank 0 only."""
    if run_dir:
        path = Path(run_dir).expanduser().absolute()
        if _holds_run(path) and not resume:
            raise UserError(f"run_dir '{path}' already holds a run; continue it with resume=auto, "
                            "or choose another run_dir")
        path.mkdir(parents=True, exist_ok=True)
        return path, bool(resume) and _holds_run(path)
    parent = Path(out_dir).expanduser().absolute() / name
    if resume == "auto":
        runs = runs_of(parent)
        if runs:
            return runs[-1], True
    return _new_dir(parent), bool(resume) and resume != "auto"


# ----------------------------------------------------------------------------------- the lock

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire(path: Path) -> None:
    """Take the run's lock or fail with one line naming its holder. A lock is stale when its pid
    is gone on this host, or when it belongs to this SLURM job (a requeued job takes it over)."""
    me = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID", "")}
    lock = path / LOCK
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                held = json.loads(lock.read_text())
            except (OSError, ValueError):
                held = {}
            same_host = held.get("host") == me["host"]
            stale = (same_host and not _alive(int(held.get("pid", 0)))) or \
                    (me["slurm_job"] and held.get("slurm_job") == me["slurm_job"])
            if not stale and held:
                raise UserError(f"run directory {path} is in use by pid {held.get('pid')} on "
                                f"{held.get('host')} (lock {lock}); wait for it or use another run")
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return
    raise UserError(f"cannot take the lock {lock}")


def release(path: Path) -> None:
    lock = path / LOCK
    try:
        if json.loads(lock.read_text()).get("pid") == os.getpid():
            lock.unlink()
    except (OSError, ValueError):
        pass
