"""Which rank stopped answering: a heartbeat per rank through the rendezvous store.

`train.collective_timeout` is the process group's timeout: a collective, a barrier or the
rendezvous that waits longer for another rank fails on every live rank (gloo raises; so does
the stop flag's gloo side group of a NCCL run, a little before NCCL's watchdog would abort the
process without a word, see dist.init). A thread in each rank bumps a counter
in the store every `period` seconds, with the wait its main thread is in (set by dist.py's
helpers). When a wait fails, the rank reads every counter twice, `2 x period` apart: a rank
whose counter stands still is stopped (SIGSTOP, a hung node, a dead process); a rank that beats
but waits in nothing is stuck outside the collectives (a stuck file system, a wedged GPU).
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as tdist

PREFIX = "and_dist/heartbeat/"
HOST = socket.gethostname()
FAILED_WAIT = re.compile(r"gloo|NCCL|[Tt]imed out|Connection (closed|reset)")


class Waits:
    """The wait the main thread is in (None outside any), for the heartbeat and the message."""
    op: str | None = None
    since: float = 0.0
    failed: str | None = None       # the wait that raised


class Heartbeat:
    def __init__(self, addr: str, port: int, rank: int, world: int, timeout: float):
        self.rank, self.world, self.timeout = rank, world, timeout
        self.period = max(0.5, min(5.0, timeout / 10))
        self.store = tdist.TCPStore(addr, port, is_master=False, timeout=timedelta(seconds=10),
                                    wait_for_workers=False)
        self.count, self.stop = 0, threading.Event()
        self.beat()
        self.thread = threading.Thread(target=self._run, name="and_dist-heartbeat", daemon=True)
        self.thread.start()

    def beat(self) -> None:
        self.count += 1
        op = Waits.op
        self.store.set(f"{PREFIX}{self.rank}", json.dumps(
            {"n": self.count, "op": op, "host": HOST, "pid": os.getpid()}))

    def _run(self) -> None:
        while not self.stop.wait(self.period):
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - the store gone: the waits will say so
                return

    def _read(self) -> dict:
        out = {}
        for r in range(self.world):
            key = f"{PREFIX}{r}"
            out[r] = json.loads(self.store.get(key)) if self.store.check([key]) else None
        return out

    def silent_ranks(self) -> tuple[list[int], dict]:
        """(ranks whose heartbeat stood still over 2 periods, the last beat of each rank)."""
        first = self._read()
        time.sleep(2.5 * self.period)
        second = self._read()
        still = [r for r in range(self.world) if r != self.rank and
                 (second[r] is None or first[r] is not None and second[r]["n"] == first[r]["n"])]
        return still, second

    def close(self) -> None:
        self.stop.set()


_beat: Heartbeat | None = None


def start(addr: str, port: int, rank: int, world: int, timeout: float) -> None:
    global _beat
    if world > 1 and _beat is None:
        try:
            _beat = Heartbeat(addr, port, rank, world, timeout)
        except Exception as e:  # noqa: BLE001 - without it a stall is still bounded, only unnamed
            print(f"[rank {rank}] warning: no heartbeat through the store at {addr}:{port} ({e}); "
                  "a stalled rank will not be named", file=sys.stderr)


def stop() -> None:
    global _beat
    if _beat is not None:
        _beat.close()
        _beat = None


def _where(e: BaseException) -> str:
    """The failed wait: the helper's name for it, and the innermost and_dist caller."""
    tb, found = e.__traceback__, None
    while tb is not None:
        code = tb.tb_frame.f_code
        name = os.path.basename(code.co_filename)
        if f"{os.sep}and_dist{os.sep}" in code.co_filename and name not in ("dist.py", "stall.py"):
            found = f"{code.co_name} ({name}:{tb.tb_lineno})"
        tb = tb.tb_next
    return " in ".join(w for w in (Waits.failed, found) if w) or "a collective"


def _end(beat: dict | None) -> str:
    """SIGKILL a silent rank on this host, so that it frees its GPU and the launcher ends now
    (torchrun waits 30 s for a stopped process to take its SIGTERM); others are the launcher's."""
    if not beat or beat.get("host") != HOST:
        return ""
    pid = int(beat["pid"])
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"and_dist" not in f.read():
                return ""
        os.kill(pid, signal.SIGKILL)
    except OSError:
        return ""
    return f" [pid {pid} on this host, killed]"


def explain(e: BaseException, rank: int) -> str | None:
    """One line for a failed wait on another rank (None for any other error)."""
    if _beat is None and not tdist.is_initialized():
        return None
    if not isinstance(e, tdist.DistError) and not (isinstance(e, RuntimeError) and FAILED_WAIT.search(str(e))):
        return None
    op = _where(e)
    waited = f"rank {rank} waited in {op}"
    limit = f" (train.collective_timeout={_beat.timeout:g} s)" if _beat else ""
    if _beat is None:
        return f"{waited}{limit} and gave up: {str(e).splitlines()[0][:200]}; continue with resume=auto"
    try:
        silent, last = _beat.silent_ranks()
    except Exception:  # noqa: BLE001 - the store itself does not answer
        return (f"{waited}{limit}; the rendezvous store stopped answering too (rank 0 under SLURM, "
                "torchrun's agent otherwise): that host stopped; continue with resume=auto")
    if silent:
        said = ", ".join(f"rank {r}" + (f" (last seen waiting in {last[r]['op']})" if last[r] and last[r]["op"]
                                        else "") + _end(last[r]) for r in silent)
        return f"{said} stopped answering; {waited}{limit}; continue with resume=auto"
    busy = [r for r in range(_beat.world) if r != rank and last[r] and not last[r]["op"]]
    if busy:
        return (f"{', '.join(f'rank {r}' for r in busy)} answered but never reached the collective "
                f"(stuck outside it); {waited}{limit}; continue with resume=auto")
    return f"{waited}{limit}, every rank still beats; the connection failed: {str(e).splitlines()[0][:200]}"

