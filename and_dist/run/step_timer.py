"""How much of the step time went to waiting for the batch, and how much to computing.

Why: in images/s alone a data-bound run (too few decode threads, a slow disk) looks like a slow
model; the split says whether to add decode threads or GPUs. The timer marks the moment the loop
asks for the next batch and the moment it has it: a wait is the span between those two marks,
compute is the span from having a batch to asking for the next one.

On CUDA the marks are timing events on the training stream, so a wait is the time the GPU itself
sat idle for the batch (one fetched while the GPU was still busy with earlier steps costs nothing),
and they are read only once the GPU has passed them (`Event.query`, no sync): the steady state
gains no host sync. `split` waits for the last mark, so call it where the loop syncs anyway.
On the CPU the marks are perf_counter readings.
"""
from __future__ import annotations

import math
import time
from typing import Iterable, Iterator

import torch

_WAIT, _COMPUTE = "wait", "compute"


class StepTimer:
    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self._marks: list[tuple[str, object]] = []     # (kind of the span it starts, event or seconds)
        self._seconds = {_WAIT: 0.0, _COMPUTE: 0.0}
        self._steps = 0

    def batches(self, items: Iterable) -> Iterator:
        """`items`, with a mark before and after fetching each one."""
        it = iter(items)
        try:
            while True:
                self._mark(_WAIT)
                try:
                    item = next(it)
                except StopIteration:
                    return
                self._mark(_COMPUTE)
                self._steps += 1
                yield item
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def split(self) -> dict:
        """Per step since the last split (or the start): ms waiting for data, ms computing, their
        sum and the wait's share of it. The span after the last mark is not counted (it is the
        fetch that found the end, or a step not yet finished)."""
        if self._marks and self.cuda:
            self._marks[-1][1].synchronize()
        self._fold(everything=True)
        self._marks.clear()
        wait, compute, steps = self._seconds[_WAIT], self._seconds[_COMPUTE], self._steps
        self._seconds, self._steps = {_WAIT: 0.0, _COMPUTE: 0.0}, 0
        if steps == 0:
            nan = float("nan")
            return {"data_wait_ms": nan, "compute_ms": nan, "step_ms": nan, "data_wait_share": nan}
        total = wait + compute
        return {"data_wait_ms": 1e3 * wait / steps, "compute_ms": 1e3 * compute / steps,
                "step_ms": 1e3 * total / steps, "data_wait_share": wait / total if total > 0 else 0.0}

    def _mark(self, kind: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append((kind, event))
            self._fold(everything=False)
        else:
            self._marks.append((kind, time.perf_counter()))
            self._fold(everything=True)

    def _fold(self, everything: bool) -> None:
        """Add the spans between marks already passed to the totals, keeping the last mark."""
        marks = self._marks
        done = 0
        while done + 1 < len(marks) and (everything or marks[done + 1][1].query()):
            (kind, a), (_, b) = marks[done], marks[done + 1]
            self._seconds[kind] += a.elapsed_time(b) / 1e3 if self.cuda else b - a
            done += 1
        del marks[:done]


def describe_split(split: dict) -> str:
    """The split for an epoch line."""
    if math.isnan(split["step_ms"]):
        return "data wait -"
    return (f"data wait {100 * split['data_wait_share']:.0f}% "
            f"({split['data_wait_ms']:.1f} of {split['step_ms']:.1f} ms/step)")
