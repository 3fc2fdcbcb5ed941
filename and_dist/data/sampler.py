"""The sample order: the epoch's global batches from (seed, round, epoch), and this rank's slice of
a step. Everything random in a run is seeded from such tuples for the whole global batch, so the
order does not depend on the number of ranks and a run resumes mid-epoch on the same trajectory."""
from __future__ import annotations

import torch

from ..platform.dist import shard_sizes


def seed_of(*parts: int) -> int:
    """A stable 63-bit seed from integers (FNV-style; never Python's salted hash)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def global_batches(n: int, batch: int, world: int, seed: int, round_: int, epoch: int) -> list[torch.Tensor]:
    """The epoch's global batches of sample indices; a last batch too small to give every rank a
    sample is dropped."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed_of(seed, round_, epoch)))
    batches = list(order.split(batch))
    if len(batches[-1]) < world:
        batches.pop()
    return batches


def rank_slice(batch_len: int, world: int, rank: int) -> tuple[int, list[int]]:
    """(offset of this rank's rows in the global batch, rows per rank)."""
    sizes = shard_sizes(batch_len, world)
    return sum(sizes[:rank]), sizes


def augment_generator(seed: int, round_: int, epoch: int, step: int) -> torch.Generator:
    """The CPU generator every rank uses to draw the augmentation of one global batch."""
    return torch.Generator().manual_seed(seed_of(seed, round_, epoch, step, 1))
