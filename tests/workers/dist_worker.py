"""Worker for the multi-process tests, run as `torchrun ... tests/workers/dist_worker.py MODE OUT`.

Modes: `discovery` (sharded discovery, both backends), `knn` (sharded kNN), `fail` (rank 1 raises
while rank 0 waits in a collective). Rank 0 saves what it computed to OUT for the test to compare.
"""
import sys

import torch
import torch.nn.functional as F

from and_dist.platform import dist
from and_dist.method.bank import ShardedBank
from and_dist.method.discovery import discover
from and_dist.eval.knn import knn_accuracy


def main(mode: str, out: str) -> None:
    env = dist.init("cpu")
    torch.set_num_threads(1)
    if mode == "discovery":
        bank = ShardedBank(701, 16, temperature=0.1, seed=5)
        assert len(bank.rows) < 701 or env.world == 1  # no rank holds the whole bank
        result = {b: discover(bank, k=3, chunk=50, backend=b) for b in ("torch", "faiss")}
        result = {b: (r.entropy, r.neighbours) for b, r in result.items()}
    elif mode == "knn":
        g = torch.Generator().manual_seed(0)
        train = F.normalize(torch.randn(1001, 32, generator=g), dim=1)
        labels = torch.randint(0, 10, (1001,), generator=g)
        queries = F.normalize(torch.randn(200, 32, generator=g), dim=1)
        qlabels = torch.randint(0, 10, (200,), generator=g)
        lo, hi = dist.shard_range(1001, env.world, env.rank)
        result = knn_accuracy(queries, qlabels, train[lo:hi], labels[lo:hi], 10, k=50, sigma=0.1, chunk=64)
    elif mode == "fail":
        if env.rank == 1:
            raise ValueError("injected failure on rank 1")
        dist.all_reduce(torch.ones(1))  # rank 0 would wait here forever without the launcher
        result = None
    else:
        raise SystemExit(f"unknown mode {mode}")
    if env.is_main:
        torch.save(result, out)
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
