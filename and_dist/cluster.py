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
    """First host of a SLURM node list without calling scontrol: 'gpu[03-05,9],cpu1' -> 'gpu03'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def placement(env=None) -> Placement:
    """torchrun sets RANK/WORLD_SIZE/MASTER_*; under plain srun we derive them from SLURM_*."""
    env = os.environ if env is None else env
    world = _int(env, "WORLD_SIZE", "SLURM_NTASKS", default=1)
    rank = _int(env, "RANK", "SLURM_PROCID", default=0)
    local = _int(env, "LOCAL_RANK", "SLURM_LOCALID", default=0)
    nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    addr = env.get("MASTER_ADDR") or (first_host(nodes) if nodes else "127.0.0.1")
    job = _int(env, "SLURM_JOB_ID", default=9500)
    port = _int(env, "MASTER_PORT", default=20000 + job % 20000)
    return Placement(rank, world, local, addr, port)
