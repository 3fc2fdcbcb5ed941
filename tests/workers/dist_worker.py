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


CLASSES, KNN_K = 10, 10


def knn_problem():
    """Clustered features (10 classes, noisy clusters with overlap), the same on every rank and in
    the test: many queries' votes are close, so a vote over other neighbours changes predictions."""
    g = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(CLASSES, 32, generator=g), dim=1)
    labels = torch.randint(0, CLASSES, (1001,), generator=g)
    qlabels = torch.randint(0, CLASSES, (120,), generator=g)
    train = F.normalize(centers[labels] + 0.5 * torch.randn(1001, 32, generator=g), dim=1)
    queries = F.normalize(centers[qlabels] + 0.5 * torch.randn(120, 32, generator=g), dim=1)
    return train, labels, queries, qlabels


def knn_predictions(queries, train, labels) -> torch.Tensor:
    """Each query's top-1 class by knn_accuracy's own vote: a query at a time, each class as its
    label until top-1 says 100 (rank 0's answer decides, so every rank makes the same calls)."""
    out = torch.full((len(queries),), -1)
    for i in range(len(queries)):
        for c in range(CLASSES):
            top1 = knn_accuracy(queries[i:i + 1], torch.tensor([c]), train, labels, CLASSES, k=KNN_K, sigma=0.1,
                                chunk=1)[0]
            if dist.all_reduce(torch.tensor([top1 if dist.rank_world()[0] == 0 else 0.0])).item() == 100.0:
                out[i] = c
                break
    return out


def main(mode: str, out: str) -> None:
    env = dist.init("cpu")
    torch.set_num_threads(1)
    if mode == "discovery":
        bank = ShardedBank(701, 16, seed=5)
        assert len(bank.rows) < 701 or env.world == 1  # no rank holds the whole bank
        result = {b: discover(bank, 0.1, k=3, chunk=50, backend=b) for b in ("torch", "faiss")}
        result = {b: (r.entropy, r.neighbours) for b, r in result.items()}
    elif mode == "knn":
        train, labels, queries, qlabels = knn_problem()
        lo, hi = dist.shard_range(len(train), env.world, env.rank)
        result = {"accuracy": knn_accuracy(queries, qlabels, train[lo:hi], labels[lo:hi], CLASSES, k=KNN_K,
                                           sigma=0.1, chunk=64),
                  "predictions": knn_predictions(queries, train[lo:hi], labels[lo:hi])}
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
