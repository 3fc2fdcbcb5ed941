"""Stop requests: SIGTERM, SIGINT, SIGUSR1/SIGUSR2 (SLURM's warning before a time limit or
preemption) set a flag; the loop asks `requested()` before each step, saves a checkpoint and
exits with 128 + the signal number.

All ranks must stop at the same step. With several ranks the flags are combined by an
asynchronous all-reduce on a CPU (gloo) side group whose result is read one step later, so the
check never blocks the device stream.
"""
from __future__ import annotations

import signal

import torch
import torch.distributed as tdist

from . import dist

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


class Stop:
    def __init__(self):
        self.signum: int | None = None
        self.group = tdist.new_group(backend="gloo", timeout=dist.timeout()) if dist.active() else None
        self.flag = torch.zeros(1)
        self.pending = None
        self.previous = {}

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

    def exit_status(self) -> int:
        return 128 + int(self.signum)
