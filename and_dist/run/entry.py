"""The shape every entry point shares (train, probe, evaluate): the process group, rank 0
deciding what all ranks do, the run directory's lock, and one exit status for every way it ends.

Exit status: 0 done; 2 a user error (one line, before work starts where possible); 128 + N when
signal N stopped the work after a checkpoint; 3 a rank stopped answering for
train.collective_timeout (the line names it); 1 anything else (one line per failing rank, the
traceback in the run's errors.log)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

from ..platform import dist, flight
from . import rundir
from .stop import masked_stop
from ..platform.errors import EXIT_USER_ERROR, UserError, exit_status


def main_decides(env, decide: Callable, share: bool = True):
    """`decide()` on rank 0 only. Its UserError stops every rank with the same line instead of
    leaving the others waiting; its result reaches every rank when `share` (else rank 0 only)."""
    answer = ("ok", None)
    if env.is_main:
        try:
            answer = ("ok", decide())
        except (UserError, FileNotFoundError) as e:
            answer = ("error", str(e))
    kind, value = dist.broadcast_object(answer if share or answer[0] == "error" else ("ok", None))
    if kind == "error":
        raise UserError(value)
    return value if share else (answer[1] if env.is_main else None)


class Session:
    """One process's part of an entry point: `Session(cfg.train).run(body)` calls `body(session)`
    inside the process group and turns how it ended into the exit status."""

    def __init__(self, train_cfg):
        self.device, self.timeout = train_cfg.device, train_cfg.collective_timeout
        self.env, self.locked, self.fresh = None, [], []

    def created(self, run: Path) -> Path:
        """`run` is new: if a user error ends the job before anything is written in it, it goes
        again (resume=auto must not find an empty run)."""
        self.fresh.append(run)
        return run

    def lock(self, run: Path) -> Path:
        """Hold `run` for this job (rank 0 takes the lock file; a live holder is a UserError)."""
        main_decides(self.env, lambda: rundir.acquire(run))
        if not self.locked and self.env.world > 1:
            flight.place(run)              # collective traces into the first (main) run held
        self.locked.append(run)
        return run

    def run(self, body: Callable[["Session"], int]) -> int:
        try:
            self.env = dist.init(self.device, self.timeout)
        except UserError as e:                   # before any process group: each rank says it
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USER_ERROR
        try:
            status = body(self)
        except Exception as e:  # noqa: BLE001 - see errors.exit_status
            if (stopped := masked_stop(e)) is not None:
                raise stopped from None            # a stop that a failing cleanup hid
            status = exit_status(e, self.env, self.locked[0] if self.locked else None)
        finally:
            if self.env.is_main:
                for run in self.locked:
                    rundir.release(run)
            dist.shutdown()
        if status == EXIT_USER_ERROR and self.env.is_main:
            for run in self.fresh:
                try:
                    run.rmdir()                    # only if empty: nothing of it is lost
                except OSError:
                    pass
        return status


def main_rank() -> bool:
    """Whether this process is rank 0, before any process group (torchrun's or SLURM's variable)."""
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def user_error_exit(fn: Callable, *args):
    """`fn(*args)`, or exit 2 with one line (on rank 0) for a UserError before any process group."""
    try:
        return fn(*args)
    except UserError as e:
        if main_rank():
            print(f"error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
