"""The memory bank, sharded by index range, and the AND loss over its full N-way softmax.

Rank r owns rows [lo, hi) of the N x D bank. A step needs every query's log-normaliser over all
N rows; each rank computes it over its own slice and the slices are combined with an exact
distributed logsumexp (all-reduce of the max, then of the sum of exponentials). With one
process the same code is the plain single-GPU algorithm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dist

INIT_BLOCK = 65536  # rows drawn per seeded block, so the initial bank is the same for any world size


class ShardedBank:
    """This rank's slice of the N x D bank of L2-normalised features."""

    def __init__(self, n: int, dim: int, temperature: float = 0.1, momentum: float = 0.5,
                 seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.n, self.dim = n, dim
        self.temperature, self.momentum = temperature, momentum
        rank, world = dist.rank_world()
        self.lo, self.hi = dist.shard_range(n, world, rank)
        self.sizes = [b - a for a, b in (dist.shard_range(n, world, r) for r in range(world))]
        self.rows = self._random_rows(seed).to(device, dtype)

    def _random_rows(self, seed: int) -> torch.Tensor:
        """Random unit vectors for rows [lo, hi), drawn in global seeded blocks."""
        parts = []
        for start in range(self.lo - self.lo % INIT_BLOCK, self.hi, INIT_BLOCK):
            g = torch.Generator().manual_seed(seed * 1_000_003 + start // INIT_BLOCK)
            block = torch.randn(min(INIT_BLOCK, self.n - start), self.dim, generator=g)
            parts.append(block[max(self.lo - start, 0): self.hi - start])
        rows = torch.cat(parts) if parts else torch.empty(0, self.dim)
        return F.normalize(rows, dim=1)

    @property
    def device(self) -> torch.device:
        return self.rows.device

    def owned(self, idx: torch.Tensor) -> torch.Tensor:
        return (idx >= self.lo) & (idx < self.hi)

    @torch.no_grad()
    def update(self, idx: torch.Tensor, feats: torch.Tensor) -> None:
        """v_i <- normalise(m v_i + (1 - m) f_i) for the rows of `idx` this rank owns.

        `idx`/`feats` are the whole global batch: updates are routed by index, so it does not
        matter which rank computed which sample.
        """
        mine = self.owned(idx)
        rows = idx[mine] - self.lo
        mixed = self.momentum * self.rows[rows] + (1 - self.momentum) * feats[mine].to(self.rows)
        self.rows[rows] = F.normalize(mixed, dim=1)

    def state_dict(self) -> dict:
        return {"lo": self.lo, "hi": self.hi, "n": self.n, "rows": self.rows.cpu()}

    def load_rows(self, lo: int, rows: torch.Tensor) -> None:
        """Copy whatever part of global rows [lo, lo + len(rows)) falls in this rank's slice."""
        a, b = max(lo, self.lo), min(lo + len(rows), self.hi)
        if a < b:
            self.rows[a - self.lo: b - self.lo] = rows[a - lo: b - lo].to(self.rows)


def positive_sets(idx: torch.Tensor, anchor: torch.Tensor | None,
                  neighbours: torch.Tensor | None) -> torch.Tensor:
    """(B, 1 + k) global indices of each query's positives: itself, plus its neighbours if it is an
    anchor; -1 pads the rows of non-anchors. Round 0 (no discovery yet) is (B, 1)."""
    if anchor is None:
        return idx[:, None]
    nbrs = neighbours[idx].to(idx)
    nbrs = torch.where(anchor[idx].to(idx.device)[:, None], nbrs, torch.full_like(nbrs, -1))
    return torch.cat([idx[:, None], nbrs], dim=1)


class _ANDLoss(torch.autograd.Function):
    """Per-query AND loss  -log sum_{j in P(i)} p_ij  over the distributed full softmax.

    Forward works on the all-gathered global batch; the gradient of query i,
    (sum_j p_ij v_j - sum_{j in P(i)} q_ij v_j) / T with q the softmax restricted to P(i), is
    summed over slices with one all-reduce, and each rank keeps the rows of its own queries.
    """

    @staticmethod
    def forward(ctx, feats, all_feats, positives, bank: ShardedBank, offset: int):
        T, rows = bank.temperature, bank.rows
        neg_inf = torch.tensor(float("-inf"), device=rows.device, dtype=rows.dtype)
        logits = torch.matmul(all_feats, rows.T).div_(T)                  # (GB, n_local), reused in place

        mine = bank.owned(positives)
        cols = (positives - bank.lo).clamp(0, max(rows.shape[0] - 1, 0))
        pos = logits.gather(1, cols) if rows.shape[0] else torch.zeros_like(cols, dtype=logits.dtype)
        pos = torch.where(mine, pos, neg_inf)
        mp = dist.all_reduce(pos.amax(1), "max")
        ep = torch.exp(pos - mp[:, None])
        lse_pos = mp + torch.log(dist.all_reduce(ep.sum(1), "sum"))

        m = logits.amax(1) if rows.shape[0] else neg_inf.expand(len(logits)).clone()
        m = dist.all_reduce(m, "max")
        p = logits.sub_(m[:, None]).exp_()                                # exp(l - max), in place
        total = dist.all_reduce(p.sum(1), "sum")
        lse = m + torch.log(total)
        loss = lse - lse_pos                                              # (GB,)

        p.div_(total[:, None])                                            # the softmax over all N
        q = torch.exp(pos - lse_pos[:, None])
        grad = p @ rows
        if rows.shape[0]:
            grad -= torch.einsum("bk,bkd->bd", q, rows[cols])             # q is 0 where not owned
        grad = dist.all_reduce(grad.div_(T), "sum")
        ctx.offset = offset
        ctx.save_for_backward(grad[offset: offset + len(feats)])
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        b = len(grad)
        offset = ctx.offset
        return grad_loss[offset: offset + b, None] * grad, None, None, None, None


def and_loss(feats: torch.Tensor, positives: torch.Tensor, bank: ShardedBank,
             sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AND loss of the global batch.

    feats: (b, D) this rank's features, rows [offset, offset + b) of the global batch, where the
    per-rank row counts are `sizes`. positives: (GB, 1 + k) from `positive_sets`.
    Returns (objective, per-query losses (GB,), all-gathered features (GB, D)); only the
    objective carries gradient. It is this rank's share of the batch-mean loss, scaled by the
    world size because DDP averages gradients over ranks: the update equals one process's.
    """
    rank, world = dist.rank_world()
    offset = sum(sizes[:rank])
    all_feats = dist.all_gather_rows(feats.detach(), sizes)
    losses = _ANDLoss.apply(feats, all_feats, positives, bank, offset)
    objective = losses[offset: offset + len(feats)].sum() * (world / len(all_feats))
    return objective, losses.detach(), all_feats
