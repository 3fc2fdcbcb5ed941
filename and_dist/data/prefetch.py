"""Build the next batches while the current step runs.

Why: a step's augmentation is tens of small ops. Issued from the training thread on the training
stream, they sit between one step's optimizer update and the next forward, and on a GPU the host
time spent launching them is time the card waits. A worker thread builds batches `depth` ahead;
on CUDA it issues them on its own stream, so the card overlaps them with the step, and the
training stream waits for each batch's event before using it (no host sync).

A batch is a pure function of (seed, round, epoch, step), so building it on another thread changes
no number, and batches built ahead of a stop are simply dropped.
"""
from __future__ import annotations

import contextlib
import queue
import threading
from typing import Iterator

import torch

from .base import Batch

_END = object()


def prefetch(batches: Iterator[Batch], depth: int, device: torch.device) -> Iterator[Batch]:
    """`batches`, produced up to `depth` ahead on a worker thread (depth 0: as they are)."""
    if depth <= 0:
        yield from batches
        return
    cuda = device.type == "cuda"
    side = torch.cuda.Stream(device) if cuda else None
    ready: queue.Queue = queue.Queue(maxsize=depth)
    closing = threading.Event()
    threads = torch.get_num_threads()

    def offer(item) -> bool:
        """Queue `item` unless the consumer has gone; False once it has."""
        while not closing.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        torch.set_num_threads(threads)            # per thread in OpenMP: keep the caller's
        try:
            if cuda:
                torch.cuda.set_device(device)     # the current device is per thread too
            with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
                for batch in batches:
                    done = None
                    if cuda:
                        done = torch.cuda.Event()
                        done.record(side)
                    if not offer((batch, done)):
                        return
            offer(_END)
        except BaseException as e:                # noqa: BLE001 - re-raised in the consumer
            offer(e)

    worker = threading.Thread(target=work, name="batch-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            batch, done = item
            if cuda:
                stream = torch.cuda.current_stream(device)
                stream.wait_event(done)
                for t in (batch.images, batch.index):
                    if t.is_cuda:                 # made on the side stream, freed after ours uses it
                        t.record_stream(stream)
            yield batch
    finally:
        closing.set()
        worker.join()
        close = getattr(batches, "close", None)
        if close is not None:
            close()

