"""The AND loss over the full N-way softmax of a sharded bank, in two parts.

1. `shard_terms`: the maths over one bank shard. For every query of the global batch it returns
   the shard's log-normaliser and softmax-weighted mean of bank rows, and the same two over the
   query's positives that live in the shard. These are exactly what a fused attention kernel
   returns (logsumexp, output) with keys = values = the shard, so a fast kernel can replace
   this part alone (see kernels/attention.py).
2. `combine`: the exact cross-rank combination of those per-shard pairs, as in split-KV
   attention: LSE = logsumexp over shards, O = sum_r exp(LSE_r - LSE) O_r.

With unit rows v_j and logits l_ij = q_i . v_j / T, the loss of query i is
LSE_i - LSE_i(positives), and its gradient (O_i - O_i(positives)) / T. With one process the
combine is the identity and the code is the plain single-GPU algorithm.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..platform import dist
from .bank import ShardedBank


@dataclass
class ShardTerms:
    lse: torch.Tensor       # (GB,) log sum_{j in shard} exp(l_ij); -inf for an empty shard
    out: torch.Tensor       # (GB, D) sum_{j in shard} softmax_shard(l)_ij v_j
    pos_lse: torch.Tensor   # (GB,) the same over the query's positives in this shard
    pos_out: torch.Tensor   # (GB, D)


def positive_logits(logits_or_queries: torch.Tensor, rows: torch.Tensor, lo: int,
                     positives: torch.Tensor, temperature: float, from_logits: bool):
    """(GB, K) logits of each query's positives held by this shard (-inf elsewhere), their
    columns and ownership mask."""
    mine = (positives >= lo) & (positives < lo + len(rows))
    cols = (positives - lo).clamp(0, max(len(rows) - 1, 0))
    if from_logits:
        pos = logits_or_queries.gather(1, cols)
    else:
        pos = torch.einsum("bd,bkd->bk", logits_or_queries, rows[cols]).div_(temperature)
    return pos.masked_fill(~mine, float("-inf")), cols, mine   # no host->device scalar copy (a sync)


def positive_terms(pos: torch.Tensor, cols: torch.Tensor, mine: torch.Tensor, rows: torch.Tensor):
    """(pos_lse, pos_out) from the positives' logits: the small, exact part every path shares."""
    pos_max = pos.amax(1)
    shift = torch.where(torch.isfinite(pos_max), pos_max, torch.zeros_like(pos_max))
    pos_lse = shift + torch.log(torch.exp(pos - shift[:, None]).sum(1))
    q = torch.where(mine, torch.exp(pos - pos_lse[:, None]), torch.zeros_like(pos))
    return pos_lse, torch.einsum("bk,bkd->bd", q, rows[cols])


def empty_terms(queries: torch.Tensor, positives: torch.Tensor) -> ShardTerms:
    gb, d = queries.shape
    neg = torch.full((gb,), float("-inf"), device=queries.device, dtype=queries.dtype)
    zeros = torch.zeros(gb, d, device=queries.device, dtype=queries.dtype)
    return ShardTerms(neg, zeros, neg.clone(), zeros.clone())


def shard_terms(queries: torch.Tensor, rows: torch.Tensor, lo: int, positives: torch.Tensor,
                temperature: float) -> ShardTerms:
    """Exact reference: one (GB x shard) logit block, reused in place."""
    if len(rows) == 0:
        return empty_terms(queries, positives)
    logits = torch.matmul(queries, rows.T).div_(temperature)
    pos, cols, mine = positive_logits(logits, rows, lo, positives, temperature, from_logits=True)
    pos_lse, pos_out = positive_terms(pos, cols, mine, rows)
    m = logits.amax(1)
    p = logits.sub_(m[:, None]).exp_()                      # exp(l - max), in place
    total = p.sum(1)
    out = p.div_(total[:, None]) @ rows                     # the shard's softmax, then its mean row
    return ShardTerms(m + torch.log(total), out, pos_lse, pos_out)


def combine(t: ShardTerms, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact split-KV combination over ranks: (per-query loss (GB,), gradient (GB, D)).
    Three all-reduces: max and sum of the two log-normalisers, then the weighted outputs."""
    both = torch.stack([t.lse, t.pos_lse], 1)
    top = dist.all_reduce(both.clone(), "max")
    lse = top + torch.log(dist.all_reduce(torch.exp(both - top), "sum"))
    w = torch.exp(both - lse)                               # each shard's share of the normaliser
    grad = w[:, :1] * t.out - w[:, 1:] * t.pos_out
    grad = dist.all_reduce(grad.div_(temperature), "sum")
    return lse[:, 0] - lse[:, 1], grad


ShardFn = Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor, float], ShardTerms]


class _ANDLoss(torch.autograd.Function):
    """Forward works on the all-gathered global batch; each rank keeps the gradient rows of its
    own queries (the gradient is already summed over shards by `combine`)."""

    @staticmethod
    def forward(ctx, feats, all_feats, positives, bank: ShardedBank, temperature: float, offset: int,
                shard_fn: ShardFn):
        terms = shard_fn(all_feats, bank.rows, bank.lo, positives, temperature)
        loss, grad = combine(terms, temperature)
        ctx.offset = offset
        ctx.save_for_backward(grad[offset: offset + len(feats)])
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        o = ctx.offset
        return grad_loss[o: o + len(grad), None] * grad, None, None, None, None, None, None


def and_loss(feats: torch.Tensor, positives: torch.Tensor, bank: ShardedBank, sizes: list[int],
             temperature: float, shard_fn: ShardFn = shard_terms) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AND loss of the global batch.

    feats: (b, D) this rank's features, rows [offset, offset + b) of the global batch, where the
    per-rank row counts are `sizes`. positives: (GB, 1 + k) from `curriculum.positive_sets`.
    Returns (objective, per-query losses (GB,), all-gathered features (GB, D)); only the
    objective carries gradient. It is this rank's share of the batch-mean loss, scaled by the
    world size because DDP averages gradients over ranks: the update equals one process's.
    """
    rank, world = dist.rank_world()
    offset = sum(sizes[:rank])
    all_feats = dist.all_gather_rows(feats.detach(), sizes)
    losses = _ANDLoss.apply(feats, all_feats.to(bank.rows.dtype), positives, bank, temperature, offset, shard_fn)
    objective = losses[offset: offset + len(feats)].sum() * (world / len(all_feats))
    return objective, losses.detach(), all_feats
