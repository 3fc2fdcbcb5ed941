"""torch's Flight Recorder: a ring buffer of each rank's recent collectives (op, sizes, sequence
number, state, Python stack), so a stall names the first collective the ranks disagree on.

Switched on for every process group; the dumps go to RUN/comm_traces/rank_<r>: NCCL's watchdog
writes them itself on a timeout (a stall inside a GPU collective outside the step loop), and a
rank whose wait failed writes its own (gloo too) before its stall line, which names the folder.
Read them with `torchfrtrace RUN/comm_traces -p rank_` (docs/runs.md)."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

BUFFER = "20000"                     # entries per rank (torchtitan's default)
DUMP_PREFIX_VARIABLE = "TORCH_FR_DUMP_TEMP_FILE"   # NCCL's dump file prefix (the rank number is appended)


def record_collectives(nccl: bool) -> None:
    """Before the process group exists: record collectives; on NCCL, dump them on a timeout.
    Settings already in the environment win."""
    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", BUFFER)
    if nccl:
        os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")


def place(run_dir: Path) -> None:
    """Dumps go into this run's comm_traces/ (once the run directory is known)."""
    folder = Path(run_dir) / "comm_traces"
    folder.mkdir(exist_ok=True)
    os.environ[DUMP_PREFIX_VARIABLE] = str(folder / "rank_")


def dump(rank: int, world: int) -> Path | None:
    """Write this rank's trace where NCCL would; the folder, or None when there is none to write."""
    prefix = os.environ.get(DUMP_PREFIX_VARIABLE)
    if not prefix or "TORCH_FR_BUFFER_SIZE" not in os.environ:
        return None
    try:
        from torch._C._distributed_c10d import _dump_fr_trace
        trace = pickle.loads(_dump_fr_trace(includeCollectives=True, includeStackTraces=True, onlyActive=False))
        # gloo's dump files its groups' ranks under "" (torch 2.13), which torchfrtrace cannot match
        # to the entries' group names; our groups all span every rank
        for name, _ in {tuple(e["process_group"]) for e in trace.get("entries", [])} - set(trace["pg_config"]):
            trace["pg_config"][name] = {"name": name, "desc": "", "ranks": str(list(range(world)))}
        trace["pg_config"].pop("", None)
        with open(f"{prefix}{rank}", "wb") as f:
            pickle.dump(trace, f)
    except Exception:  # noqa: BLE001 - a trace is extra; the stall line must still come
        return None
    return Path(prefix).parent
