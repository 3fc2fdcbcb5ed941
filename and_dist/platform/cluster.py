"""Where this process sits in its job: rank, world size, local rank and the rendezvous address,
from torchrun's variables, else SLURM's (srun tasks), else a single process.

Shared by `dist.init` and `launch/`; knows nothing of torch.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    rank: int
    world: int
    local_rank: int
    master_addr: str
    master_port: int


def _int(env, *names: str, default: int) -> int:
    for name in names:
        if env.get(name, "") != "":
            return int(env[name])
    return default


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list without calling scontrol: 'gpu[03-05,9],cpu1' -> 'gpu03',
    'rack[1-2]-node[01-04]' -> 'rack1-node01' (every bracket group at its first value)."""
    text, depth, end = nodelist.strip(), 0, None
    for i, ch in enumerate(text):                    # the first name: up to a comma outside brackets
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            end = i
            break
    name = text[:end]
    if not name or depth < 0:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    return re.sub(r"\[([^\]]+)\]", lambda m: m.group(1).split(",")[0].split("-")[0], name)


def placement(env=None) -> Placement:
    """torchrun sets RANK/WORLD_SIZE/MASTER_*; in an srun step we derive them from SLURM_*. A
    batch script or salloc shell (SLURM_NTASKS but no step) is one process: the job's other
    tasks would never start, and rank 0 would wait for them forever."""
    env = os.environ if env is None else env
    if "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env:
        env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    world = _int(env, "WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", default=1)
    rank = _int(env, "RANK", "SLURM_PROCID", default=0)
    local = _int(env, "LOCAL_RANK", "SLURM_LOCALID", default=0)
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    addr = env.get("MASTER_ADDR") or (first_host(nodes) if nodes else "127.0.0.1")
    job = _int(env, "SLURM_JOB_ID", default=9500)
    port = _int(env, "MASTER_PORT", default=15000 + job % 17000)   # below Linux's ephemeral ports
    return Placement(rank, world, local, addr, port)
