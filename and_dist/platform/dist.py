"""Process-group set-up and the handful of collectives the sharded bank needs.

Every helper is a no-op when the process group is not initialised, so single-process runs and
tests take the same code path as distributed ones.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from . import flight, stall
from .cluster import placement
from .errors import EXIT_STALLED, UserError

NCCL_GRACE = 60      # NCCL's watchdog fires this much later than gloo, so gloo's error is the one seen
_timeout = timedelta(seconds=600)


@dataclass(frozen=True)
class Env:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _cuda_device(where) -> torch.device:
    """This process's GPU: the one it sees when bound to one GPU per task (srun --gpus-per-task,
    or CUDA_VISIBLE_DEVICES per rank), else number LOCAL_RANK of the node's."""
    count = torch.cuda.device_count()
    if count == 1:
        return torch.device("cuda", 0)
    if where.local_rank >= count:
        raise UserError(f"rank {where.rank} is process {where.local_rank} of its node but the node shows "
                        f"{count} GPUs: start one process per GPU (or train.device=cpu)")
    return torch.device("cuda", where.local_rank)


def init(device: str = "auto", timeout: float = 600) -> Env:
    """Join the job's process group (torchrun or SLURM placement, see cluster.py), or run alone.
    `timeout` bounds the rendezvous and every later wait for another rank (stall.py)."""
    global _timeout
    _timeout = timedelta(seconds=timeout)
    where = placement()
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = _cuda_device(where) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if where.world > 1 and not dist.is_initialized():
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = where.master_addr, str(where.master_port)
        flight.record_collectives(use_cuda)
        try:
            dist.init_process_group("nccl" if use_cuda else "gloo", rank=where.rank, world_size=where.world,
                                    device_id=dev if use_cuda else None,
                                    timeout=timedelta(seconds=timeout + (NCCL_GRACE if use_cuda else 0)))
        except dist.DistError as e:      # one line, exit 1: a rank or the store never came
            print(f"[rank {where.rank}] error: the rendezvous at {where.master_addr}:{where.master_port} "
                  f"failed within train.collective_timeout={timeout:g} s: {str(e).splitlines()[0][:200]}",
                  file=sys.stderr)
            raise SystemExit(EXIT_STALLED) from None
        stall.start(where.master_addr, where.master_port, where.rank, where.world, timeout)
    return Env(where.rank, where.world, where.local_rank, dev)


def timeout() -> timedelta:
    """train.collective_timeout, for the side groups (stop.py)."""
    return _timeout


@contextmanager
def waiting(op: str):
    """Name the wait the main thread is in, for the heartbeat and a stall's message."""
    outer = stall.Waits.op, stall.Waits.since
    stall.Waits.op, stall.Waits.since = op, time.monotonic()
    try:
        yield
    except BaseException:
        stall.Waits.failed = stall.Waits.failed or op
        raise
    finally:
        stall.Waits.op, stall.Waits.since = outer


def shutdown() -> None:
    stall.stop()
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def shard_range(n: int, world: int, rank: int) -> tuple[int, int]:
    """Contiguous balanced slice [lo, hi) of n items owned by `rank` (sizes differ by at most one)."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def shard_sizes(n: int, world: int) -> list[int]:
    """Rows per rank of the balanced split of n items (the sizes every all-gather here uses)."""
    return [hi - lo for lo, hi in (shard_range(n, world, r) for r in range(world))]


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce ("sum" or "max"); returns t for chaining."""
    if active():
        with waiting("all_reduce"):
            dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def all_gather_rows(t: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate every rank's rows in rank order. `sizes` (rows per rank) allows uneven shards."""
    if not active():
        return t
    world = dist.get_world_size()
    if sizes is None:
        sizes = [t.shape[0]] * world
    longest = max(sizes)
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    with waiting("all_gather"):
        dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def broadcast_object(obj, src: int = 0, op: str = "broadcast"):
    if not active():
        return obj
    box = [obj]
    with waiting(op):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj, op: str = "all_gather_object") -> list:
    """Every rank's `obj`, in rank order."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    with waiting(op):
        dist.all_gather_object(out, obj)
    return out


def barrier(op: str = "barrier") -> None:
    if active():
        with waiting(op):
            dist.barrier()


def data_parallel(module: torch.nn.Module, env: Env) -> torch.nn.Module:
    """`module` under DistributedDataParallel when there are several ranks, else itself."""
    if env.world == 1:
        return module
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[env.device] if env.device.type == "cuda" else None)
