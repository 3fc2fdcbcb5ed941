"""Weighted kNN evaluation (Wu et al. 2018; AND uses k=200, sigma=0.1) over sharded train features.

Each rank keeps only its own slice of train features, returns its top-k candidates per query, and
the candidates are merged: no rank ever gathers the whole train feature matrix.
"""
from __future__ import annotations

import torch

from ..platform import dist, memory
from ..platform.log import NoBar


@torch.no_grad()
def knn_predict(queries: torch.Tensor, train_feats: torch.Tensor, train_labels: torch.Tensor, num_classes: int,
                k: int = 200, sigma: float = 0.1, chunk: int | str = "auto", progress=None) -> torch.Tensor:
    """(Q, min(5, C)) classes of each query, by falling weighted vote, on the CPU.

    queries: every query, the same on all ranks. train_feats/train_labels: this rank's slice.
    A query's vote for class c is the sum of exp(sim / sigma) over its k nearest train rows of c.
    """
    _, world = dist.rank_world()
    k_local = min(k, len(train_feats))
    chunk = memory.resolve_chunk(chunk, 2 * len(train_feats) * train_feats.element_size(), 0,
                                 train_feats.device, len(queries), what="kNN chunk")
    if world > 1:  # every rank must run the same chunks: each chunk is a collective
        chunk = int(-dist.all_reduce(torch.tensor([-chunk], device=train_feats.device), "max").item())
    preds = []
    for a in range(0, len(queries), chunk):
        q = queries[a: a + chunk].to(train_feats)
        sims = q @ train_feats.T
        v, i = sims.topk(k_local, dim=1)
        lab = train_labels.to(i.device)[i]
        if k_local < k:  # pad so every rank contributes k candidates
            pad = k - k_local
            v = torch.cat([v, v.new_full((len(q), pad), float("-inf"))], 1)
            lab = torch.cat([lab, lab.new_zeros((len(q), pad))], 1)
        if world > 1:
            v = dist.all_gather_rows(v[None].contiguous(), [1] * world).permute(1, 0, 2).reshape(len(q), -1)
            lab = dist.all_gather_rows(lab[None].contiguous(), [1] * world).permute(1, 0, 2).reshape(len(q), -1)
            v, j = v.topk(k, dim=1)
            lab = lab.gather(1, j)
        votes = torch.zeros(len(q), num_classes, device=v.device, dtype=v.dtype)
        votes.scatter_add_(1, lab, torch.exp(v / sigma))
        preds.append(votes.topk(min(5, num_classes), dim=1).indices.cpu())
        if progress is not None:
            progress(len(q))
    return torch.cat(preds) if preds else torch.empty(0, min(5, num_classes), dtype=torch.long)


def knn_accuracy(queries: torch.Tensor, query_labels: torch.Tensor, train_feats: torch.Tensor,
                 train_labels: torch.Tensor, num_classes: int, k: int = 200, sigma: float = 0.1,
                 chunk: int | str = "auto", progress=None) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (%) of `knn_predict` against the queries' labels."""
    pred = knn_predict(queries, train_feats, train_labels, num_classes, k, sigma, chunk, progress)
    truth = query_labels.cpu()[:, None]
    n = max(len(queries), 1)
    return 100.0 * (pred[:, :1] == truth).sum().item() / n, 100.0 * (pred == truth).any(1).sum().item() / n


def knn_eval(model, data, env, k: int, sigma: float, train_feats: torch.Tensor | None = None,
             dtype: torch.dtype = torch.float32, bar=None) -> tuple[float, float]:
    """kNN top-1/top-5 (%) of the test split against this rank's slice of train features: the bank
    rows if given, else recomputed with the test transform. Test features are computed shard by
    shard and shared; train features stay sharded. `bar(total, desc)` makes a progress bar."""
    from .features import extract
    bar = bar or (lambda total, desc: NoBar())

    def features(split: str, lo: int, hi: int) -> torch.Tensor:
        b = bar(hi - lo, f"{split} features")
        out = extract(model, data.eval_images(split, lo, hi), dtype, b.update)
        b.close()
        return out

    lo, hi = dist.shard_range(len(data.train), env.world, env.rank)
    if train_feats is None:
        train_feats = features("train", lo, hi)
    n_test = len(data.test)
    test = features("test", *dist.shard_range(n_test, env.world, env.rank))
    test = dist.all_gather_rows(test.to(train_feats.dtype), dist.shard_sizes(n_test, env.world))
    b = bar(n_test, "kNN")
    acc = knn_accuracy(test, data.test.labels, train_feats, data.train.labels[lo:hi],
                       len(data.train.classes), k, sigma, progress=b.update)
    b.close()
    return acc
