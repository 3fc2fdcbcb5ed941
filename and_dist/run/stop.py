"""Stop requests: SIGTERM, SIGINT, SIGUSR1/SIGUSR2 (SLURM's warning before a time limit or
preemption) set a flag; the loop asks `requested()` before each step, saves a checkpoint and
exits with 128 + the signal number. Outside a loop (set-up, a kNN pass, prepare, export) the
same signals raise `Stopped` (`raising()`), so what is half-written is removed on the way out
and the exit status is the same 128 + N.

All ranks must stop at the same step. With several ranks the flags are combined by an
asynchronous all-reduce on a CPU (gloo) side group whose result is read one step later, so the
check never blocks the device stream.
"""
from __future__ import annotations

import fnmatch
import functools
import os
import signal
import sys
from contextlib import contextmanager

import torch
import torch.distributed as tdist

from ..platform import dist

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


class Stopped(BaseException):
    """A stop signal where no checkpoint is taken: a BaseException, so `except Exception` blocks
    let it pass and only `finally` / `except BaseException` cleanups run."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def test_signal(point: str) -> None:
    """Test hook: AND_TEST_SIGNAL_AT=<pattern> sends this process SIGTERM when the work reaches a
    point whose name matches (fnmatch): "knn" (evaluate's kNN pass), "write:<file name>" (inside a
    durable file write), so a test's stop lands inside that phase instead of racing it."""
    at = os.environ.get("AND_TEST_SIGNAL_AT")
    if at and fnmatch.fnmatchcase(point, at):
        os.kill(os.getpid(), signal.SIGTERM)


def _raise(signum, frame):
    raise Stopped(signum)


@contextmanager
def raising():
    """Inside, a stop signal raises Stopped in the main thread (processes forked inside inherit it)."""
    previous = {s: signal.signal(s, _raise) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def quiet_worker() -> None:
    """A pool worker's initializer: a stop signal ends it quietly (SystemExit) after its cleanups;
    the parent reports the stop."""
    for s in SIGNALS:
        signal.signal(s, lambda signum, frame: sys.exit(128 + signum))


def finish_pool(pool) -> None:
    """End a pool whose work is done: its workers leave on their own. Not `terminate()` (what a
    `with Pool` block does on the way out), whose SIGTERM meets each worker's stop handler mid-wait."""
    pool.close()
    pool.join()


def masked_stop(e: BaseException) -> Stopped | None:
    """The Stopped that `e` was raised while handling, if any: a library's own cleanup can fail
    when a stop interrupts it (torch.save's zip writer closing a half-written file), and that
    error must not turn the stop into a crash."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, Stopped):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def exits_on_stop(again: str):
    """For an entry point's main: a stop signal anywhere outside a training loop ends it with one
    line and exit status 128 + N, after the cleanups on the way out; `again` tells what to run."""
    def wrap(main):
        @functools.wraps(main)
        def run(*args, **kwargs) -> int:
            try:
                with raising():
                    return main(*args, **kwargs)
            except Exception as e:
                stopped = masked_stop(e)
                if stopped is None:
                    raise
                print(f"{stopped}: nothing half-written is left; {again}", file=sys.stderr)
                return stopped.exit_status
            except Stopped as e:
                print(f"{e}: nothing half-written is left; {again}", file=sys.stderr)
                return e.exit_status
        return run
    return wrap


class Stop:
    def __init__(self):
        self.signum: int | None = None
        self.group = tdist.new_group(backend="gloo", timeout=dist.timeout()) if dist.active() else None
        self.flag = torch.zeros(1)
        self.pending = None
        self.previous = {}
        # Test hook: AND_TEST_STOP_AFTER_STEPS=n stops this segment as a SIGTERM would, after its
        # n-th step in one process (n + 1 with several ranks: the flag is agreed a step later), so
        # a test's stop lands at a chosen step instead of racing a signal.
        self.test_steps = int(os.environ.get("AND_TEST_STOP_AFTER_STEPS", "-1") or -1)

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._on_signal) for s in SIGNALS}
        return self

    def __exit__(self, exc_type, *exc):
        if self.pending is not None and exc_type is None:    # after a failed wait it may never end
            self.pending.wait()
        self.pending = None
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _on_signal(self, signum, frame) -> None:
        self.signum = signum

    def requested(self) -> bool:
        if self.test_steps >= 0:
            self.test_steps -= 1
            if self.test_steps < 0:
                self._on_signal(signal.SIGTERM, None)
        if self.group is None:
            return self.signum is not None
        stop = False
        if self.pending is not None:
            with dist.waiting("the stop-flag all-reduce of a training step"):
                self.pending.wait()
            stop = self.flag.item() > 0
        if stop:
            self.signum = self.signum or signal.SIGTERM   # another rank got it
            self.pending = None
            return True
        self.flag.fill_(1.0 if self.signum is not None else 0.0)
        self.pending = tdist.all_reduce(self.flag, op=tdist.ReduceOp.MAX, group=self.group, async_op=True)
        return False

    def agreed(self) -> bool:
        """Whether any rank was asked to stop, agreed now with a blocking all-reduce: for the end
        of a phase that has no steps (a kNN pass), where `requested()`'s one-step lag has nothing
        to hide behind."""
        if self.group is None:
            return self.signum is not None
        if self.pending is not None:
            with dist.waiting("the stop-flag all-reduce"):
                self.pending.wait()
            self.pending = None
        flag = torch.tensor([1.0 if self.signum is not None or self.flag.item() > 0 else 0.0])
        with dist.waiting("the stop-flag all-reduce"):
            tdist.all_reduce(flag, op=tdist.ReduceOp.MAX, group=self.group)
        if flag.item() > 0:
            self.signum = self.signum or signal.SIGTERM
        return flag.item() > 0

    def exit_status(self) -> int:
        return 128 + int(self.signum)
