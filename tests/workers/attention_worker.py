"""Worker for tests/test_attention.py, run as `torchrun ... tests/workers/attention_worker.py DTYPE OUT`.

Each rank holds a slice of one bank; the AND loss and gradient of a global batch are computed with
the exact per-shard maths and with the attention kernel, both combined across ranks (split-KV);
discovery runs with the exact and the attention kernels. Rank 0 saves everything to OUT.
"""
import sys

import torch
import torch.nn.functional as F

from and_dist.platform import dist
from and_dist.method.kernels.attention import shard_terms_attention
from and_dist.method.bank import ShardedBank
from and_dist.method.curriculum import positive_sets
from and_dist.method.discovery import discover
from and_dist.method.loss import and_loss, shard_terms

N, DIM, BATCH = 1203, 32, 48
T = 0.07                      # not the default 0.1: a temperature lost on the way shows


def problem(dtype):
    """The same bank, batch, features and anchors on every rank and in the test."""
    g = torch.Generator().manual_seed(3)
    idx = torch.randperm(N, generator=g)[:BATCH]
    anchor = torch.rand(N, generator=g) < 0.5
    neighbours = torch.randint(0, N, (N, 2), generator=g)
    feats = F.normalize(torch.randn(BATCH, DIM, generator=g, dtype=torch.float64), dim=1).to(dtype)
    bank = ShardedBank(N, DIM, seed=4, dtype=dtype)
    return bank, positive_sets(idx, anchor, neighbours), feats


def loss_and_grad(bank, positives, feats, shard_fn):
    """Per-query losses and d(mean loss)/d(features) of the whole global batch."""
    rank, world = dist.rank_world()
    sizes = dist.shard_sizes(BATCH, world)
    lo = sum(sizes[:rank])
    mine = feats[lo: lo + sizes[rank]].clone().requires_grad_()
    objective, losses, _ = and_loss(mine, positives, bank, sizes, T, shard_fn)
    objective.backward()
    return losses, dist.all_gather_rows(mine.grad / world, sizes)


def main(dtype_name: str, out: str) -> None:
    env = dist.init("cpu")
    torch.set_num_threads(1)
    dtype = getattr(torch, dtype_name)
    bank, positives, feats = problem(dtype)
    result = {name: loss_and_grad(bank, positives, feats, fn)
              for name, fn in (("exact", shard_terms), ("attention", shard_terms_attention))}
    for kernel in ("exact", "attention"):
        nb = discover(bank, T, k=2, chunk=100, kernel=kernel)
        result[f"discover-{kernel}"] = (nb.entropy, nb.neighbours)
    if env.is_main:
        torch.save(result, out)
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
