"""What a SLURM partition offers (from `sinfo`), so that a request it can never satisfy is refused
before submission instead of pending forever: unknown partition, more nodes than it has, more
GPUs or CPUs per node than its largest node."""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

FORMAT = "%P|%D|%c|%G|%l"   # partition (default marked *), nodes, CPUs per node, generic resources, time limit


@dataclass(frozen=True)
class Partition:
    name: str
    nodes: int
    max_cpus: int
    max_gpus: int
    max_minutes: int | None = None          # the partition's time limit; None: no limit


def minutes_of(limit: str) -> int | None:
    """sinfo's %l ('infinite', '2-00:00:00', '12:00:00', '30:00' = minutes:seconds) -> minutes."""
    if not limit or limit in ("infinite", "UNLIMITED", "n/a"):
        return None
    try:
        days, _, clock = limit.rpartition("-")
        parts = [int(x) for x in clock.split(":")]
        h, m, s = ([0] * (3 - len(parts)) + parts) if len(parts) > 1 else (0, parts[0], 0)
        return int(days or 0) * 1440 + h * 60 + m + (s > 0)
    except ValueError:
        return None


def gpus_of(gres: str) -> int:
    """GPUs per node from sinfo's %G: 'gpu:8', 'gpu:a100:4(S:0-1),shard:2' -> 8, 4; '(null)' -> 0."""
    return sum(int(n) for n in re.findall(r"(?:^|,)gpu(?::[^:,(]+)?:(\d+)", gres))


def parse(text: str) -> dict[str, Partition]:
    """sinfo lines (one per partition and node type) -> partitions; the default one also under ''."""
    found: dict[str, Partition] = {}
    default = ""
    for line in text.splitlines():
        if not line.strip():
            continue
        name, nodes, cpus, gres, *limit = line.strip().split("|")
        if name.endswith("*"):
            name = default = name[:-1]
        old = found.get(name, Partition(name, 0, 0, 0))
        found[name] = Partition(name, old.nodes + int(nodes), max(old.max_cpus, int(cpus.rstrip("+"))),
                                max(old.max_gpus, gpus_of(gres)), minutes_of(limit[0]) if limit else None)
    if default:
        found[""] = found[default]
    return found


def query() -> dict[str, Partition] | None:
    """The cluster's partitions (hidden ones too), or None where there is no sinfo (not on a SLURM
    login node); a failing sinfo is a one-line error with its own message."""
    if shutil.which("sinfo") is None:
        return None
    from submitit.helpers import clean_env
    with clean_env():                  # inside an allocation its SLURM_* variables would leak in
        out = subprocess.run(["sinfo", "-a", "-h", "-o", FORMAT], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        from and_dist.platform.errors import UserError
        said = (out.stderr or out.stdout).strip().splitlines()
        raise UserError(f"sinfo failed ({said[-1] if said else f'exit status {out.returncode}'}): is the SLURM "
                        "controller reachable? (--dry-run skips the check)")
    return parse(out.stdout)


def problems(partitions: dict[str, Partition], partition: str, nodes: int, gpus_per_node: int,
             tasks_per_node: int, cpus_per_task: int) -> list[str]:
    """Why the request cannot run on `partition` ('' = the default); empty when it can."""
    if partition not in partitions:
        known = ", ".join(sorted(p for p in partitions if p)) or "none"
        what = f"unknown partition '{partition}'" if partition else "the cluster has no default partition"
        return [f"{what} (partitions: {known}); choose one with --partition"]
    p = partitions[partition]
    out = []
    if nodes > p.nodes:
        out.append(f"--nodes {nodes}: partition '{p.name}' has {p.nodes} node{'s' * (p.nodes != 1)}")
    if gpus_per_node > p.max_gpus:
        out.append(f"--gpus-per-node {gpus_per_node}: the nodes of partition '{p.name}' have at most "
                   f"{p.max_gpus} GPU{'s' * (p.max_gpus != 1)}")
    if tasks_per_node * cpus_per_task > p.max_cpus:
        out.append(f"{tasks_per_node} task{'s' * (tasks_per_node != 1)} x --cpus-per-task {cpus_per_task} "
                   f"per node: the nodes of partition '{p.name}' have at most {p.max_cpus} CPUs")
    return out
