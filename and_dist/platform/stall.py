"""Which rank stopped answering: a heartbeat per rank through the rendezvous store.

`train.collective_timeout` is the process group's timeout: a collective, a barrier or the
rendezvous that waits longer for another rank fails on every live rank (gloo raises; so does
the stop flag's gloo side group of a NCCL run, a little before NCCL's watchdog would abort the
process without a word, see dist.init). A thread in each rank bumps a counter
in the store every `period` seconds, with the wait its main thread is in (set by dist.py's
helpers). When a wait fails, the rank reads every counter twice, `2 x period` apart: a rank
whose counter stands still is stopped (SIGSTOP, a hung node, a dead process); a rank that beats
but waits in nothing is stuck outside the collectives (a stuck file system, a wedged GPU).

A failed wait is known by where it raised, not by its wording alone: gloo's words for the same
timeout vary with the interleaving ("Timed out waiting ..." from the op that timed out,
"Application timeout caused pair closure" from another op on the closed pair), and DDP's own
collectives (the buffer broadcast before each forward, the gradient all-reduce) run outside
dist.py's named waits.
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

HEARTBEAT_KEY = "and_dist/heartbeat/"
HOST = socket.gethostname()
FAILED_WAIT = re.compile(r"gloo|NCCL|[Tt]imed out|[Tt]imeout|pair closure|Connection (closed|reset)")
TORCH_DIST = (f"{os.sep}torch{os.sep}distributed{os.sep}", f"{os.sep}torch{os.sep}nn{os.sep}parallel{os.sep}")


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat, field 22): with the pid
    it names one process, so a pid reused after that rank died is never signalled."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


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
        self.started = _start_time(os.getpid())
        self.beat()
        self.thread = threading.Thread(target=self._run, name="and_dist-heartbeat", daemon=True)
        self.thread.start()

    def beat(self) -> None:
        self.count += 1
        op = Waits.op
        self.store.set(f"{HEARTBEAT_KEY}{self.rank}", json.dumps(
            {"n": self.count, "op": op, "host": HOST, "pid": os.getpid(), "started": self.started}))

    def _run(self) -> None:
        while not self.stop.wait(self.period):
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - the store gone: the waits will say so
                return

    def _read(self) -> dict:
        out = {}
        for r in range(self.world):
            key = f"{HEARTBEAT_KEY}{r}"
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


def _frames(e: BaseException):
    tb = e.__traceback__
    while tb is not None:
        yield tb.tb_frame.f_code, tb.tb_lineno
        tb = tb.tb_next


def _is_failed_wait(e: BaseException) -> bool:
    """A collective, barrier or rendezvous that raised: torch's distributed error type, an error
    that left one of dist.py's named waits or torch's distributed code (DDP's collectives), or
    the backends' words (DDP's gradient all-reduce raises from the autograd engine)."""
    if isinstance(e, tdist.DistError) or (isinstance(e, RuntimeError) and Waits.failed):
        return True
    return isinstance(e, RuntimeError) and (
        any(part in code.co_filename for code, _ in _frames(e) for part in TORCH_DIST)
        or bool(FAILED_WAIT.search(str(e))))


def _where(e: BaseException) -> str:
    """The failed wait: the helper's name for it (else torch's innermost distributed function),
    and the innermost and_dist caller."""
    found, torch_op = None, None
    for code, line in _frames(e):
        name = os.path.basename(code.co_filename)
        if f"{os.sep}and_dist{os.sep}" in code.co_filename and name not in ("dist.py", "stall.py"):
            found = f"{code.co_name} ({name}:{line})"
        elif any(part in code.co_filename for part in TORCH_DIST):
            torch_op = f"torch's {code.co_name}"
    return " in ".join(w for w in (Waits.failed or torch_op, found) if w) or "a collective"


def _endable(beat: dict | None) -> int | None:
    """The pid of a silent rank this process may end: on this host, and still the same process."""
    if not beat or beat.get("host") != HOST or beat.get("started") is None:
        return None
    pid = int(beat["pid"])
    return pid if _start_time(pid) == beat["started"] else None


_to_end: list[int] = []


def end_silent() -> None:
    """SIGKILL the silent ranks on this host that explain() named, once its line is out: so that
    they free their GPU and the launcher ends now (torchrun waits 30 s for a stopped process to
    take its SIGTERM, and SIGTERMs this rank as soon as one of its ranks is gone). Ranks on other
    hosts are their launchers'."""
    while _to_end:
        try:
            os.kill(_to_end.pop(), signal.SIGKILL)
        except OSError:
            pass


def explain(e: BaseException, rank: int) -> str | None:
    """One line for a failed wait on another rank (None for any other error); the silent ranks
    it names on this host are ended by end_silent() once the line is printed."""
    if _beat is None and not tdist.is_initialized():
        return None
    if not _is_failed_wait(e):
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
        ends = {r: _endable(last[r]) for r in silent}
        _to_end[:] = [pid for pid in ends.values() if pid is not None]
        said = ", ".join(f"rank {r}" + (f" (last seen waiting in {last[r]['op']})" if last[r] and last[r]["op"]
                                        else "") + (f" [pid {ends[r]} on this host, killed]" if ends[r] else "")
                         for r in silent)
        return f"{said} stopped answering; {waited}{limit}; continue with resume=auto"
    busy = [r for r in range(_beat.world) if r != rank and last[r] and not last[r]["op"]]
    if busy:
        return (f"{', '.join(f'rank {r}' for r in busy)} answered but never reached the collective "
                f"(stuck outside it); {waited}{limit}; continue with resume=auto")
    return f"{waited}{limit}, every rank still beats; the connection failed: {str(e).splitlines()[0][:200]}"

