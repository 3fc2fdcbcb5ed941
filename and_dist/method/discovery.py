"""Neighbourhood discovery: each sample's softmax entropy over the whole bank and its k nearest
neighbours (itself excluded), from one pass over blocks of bank similarities.

Sharded: every rank holds one bank slice and computes the statistics of its own rows; the slices
travel round a ring so each rank sees every slice once, holding at most two slices and one
(chunk x slice) block of similarities. Entropy is accumulated with a fixed shift in
float64, so the result does not depend on how the bank is cut into slices and chunks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as tdist

from .. import dist
from .bank import ShardedBank


@dataclass
class Neighbourhood:
    entropy: torch.Tensor      # (N,) float64, entropy of each row's softmax over the bank
    neighbours: torch.Tensor   # (N, k) int64, nearest rows by cosine similarity, self excluded


class _Stats:
    """Per-row accumulators: sum of exp(logit - 1/T), its logit-weighted sum, and a running top-k.

    Rows are unit vectors, so every logit is at most 1/T (a row's own logit is exactly that):
    1/T is a fixed, safe logsumexp shift. Unlike a running max it is the same however the bank is
    cut into slices and chunks, so each term is computed identically and only the float64
    summation order can differ.
    """

    def __init__(self, rows: int, k: int, temperature: float, device):
        self.shift = 1.0 / temperature
        self.s = torch.zeros(rows, dtype=torch.float64, device=device)
        self.t = torch.zeros(rows, dtype=torch.float64, device=device)
        self.top_v = torch.full((rows, k), float("-inf"), device=device)
        self.top_i = torch.full((rows, k), -1, dtype=torch.long, device=device)

    def add_logits(self, r: slice, logits: torch.Tensor, scratch: torch.Tensor) -> None:
        """Fold a block of logits into the sums; `scratch` (same shape) is overwritten.

        Block sums are float32 (pairwise), accumulated across blocks in float64; no block-sized
        temporaries are allocated, since page-faulting fresh memory costs more than the maths."""
        e = torch.sub(logits, self.shift, out=scratch).exp_()
        self.s[r] += e.sum(1).double()
        self.t[r] += e.mul_(logits).sum(1).double()

    def add_candidates(self, r: slice, values: torch.Tensor, index: torch.Tensor) -> None:
        """Merge candidate neighbours into the running top-k; ties go to the lower index."""
        v = torch.cat([self.top_v[r], values], 1)
        i = torch.cat([self.top_i[r], index], 1)
        by_index = torch.sort(i, dim=1, stable=True).indices
        v, i = v.gather(1, by_index), i.gather(1, by_index)
        best = torch.sort(v, dim=1, descending=True, stable=True).indices[:, : self.top_v.shape[1]]
        self.top_v[r], self.top_i[r] = v.gather(1, best), i.gather(1, best)

    def entropy(self) -> torch.Tensor:
        """H = logsumexp(l) - sum_j p_j l_j."""
        return self.shift + torch.log(self.s) - self.t / self.s


def _block_candidates(sims: torch.Tensor, q_rows: torch.Tensor, slice_rows: torch.Tensor,
                      k: int, precision: str):
    """Top-k columns of a similarity block; in bf16 mode re-rank extra candidates in fp32."""
    if precision == "bf16":
        v, i = sims.float().topk(min(k + 8, sims.shape[1]), dim=1)
        exact = torch.einsum("bd,bkd->bk", q_rows, slice_rows[i])
        exact = torch.where(torch.isinf(v), v, exact)
        v, j = exact.topk(min(k, exact.shape[1]), dim=1)
        return v, i.gather(1, j)
    return sims.topk(min(k, sims.shape[1]), dim=1)


class _FaissSlice:
    """Exact inner-product search over one bank slice: an IndexFlatIP built once per slice on
    CPU, or `faiss.knn_gpu` straight on CUDA tensors when faiss-gpu is installed."""

    def __init__(self, slice_rows: torch.Tensor, s_lo: int):
        import faiss
        self.faiss, self.rows, self.s_lo = faiss, slice_rows, s_lo
        self.gpu = slice_rows.is_cuda and hasattr(faiss, "knn_gpu")
        if self.gpu:
            import faiss.contrib.torch_utils  # noqa: F401  (lets faiss take torch CUDA tensors)
            self.res = faiss.StandardGpuResources()
        else:
            self.index = faiss.IndexFlatIP(slice_rows.shape[1])
            self.index.add(slice_rows.float().cpu().numpy())

    def candidates(self, q_rows: torch.Tensor, k: int, q_lo: int):
        """Top-(k+1) by inner product, with each query's own row masked out."""
        kk = min(k + 1, len(self.rows))
        if self.gpu:
            v, i = self.faiss.knn_gpu(self.res, q_rows, self.rows, kk, metric=self.faiss.METRIC_INNER_PRODUCT)
        else:
            v, i = self.index.search(q_rows.float().cpu().numpy(), kk)
            v, i = torch.from_numpy(v).to(q_rows.device), torch.from_numpy(i).to(q_rows.device)
        i = i.long() + self.s_lo
        is_self = i == (q_lo + torch.arange(len(q_rows), device=i.device))[:, None]
        return torch.where(is_self, torch.tensor(float("-inf"), device=v.device), v), i


def _ring_slices(bank: ShardedBank):
    """Yield (lo, rows) for every bank slice, passing slices round the ranks."""
    rank, world = dist.rank_world()
    current, owner = bank.rows.contiguous(), rank
    for step in range(world):
        lo = dist.shard_range(bank.n, world, owner)[0]
        yield lo, current
        if step == world - 1:
            break
        nxt_owner = (owner - 1) % world
        nxt = torch.empty(bank.sizes[nxt_owner], bank.dim, dtype=current.dtype, device=current.device)
        ops = [tdist.P2POp(tdist.isend, current, (rank + 1) % world),
               tdist.P2POp(tdist.irecv, nxt, (rank - 1) % world)]
        for req in tdist.batch_isend_irecv(ops):
            req.wait()
        current, owner = nxt, nxt_owner


@torch.no_grad()
def discover(bank: ShardedBank, k: int = 1, chunk: int = 2048, backend: str = "torch",
             precision: str = "fp32", progress=None) -> Neighbourhood:
    """Entropy and k nearest neighbours of every bank row; the result is replicated on all ranks.

    progress: optional callable(n_done) advanced once per finished row chunk (rank 0 shows a bar).
    """
    own = bank.rows
    n_own = len(own)
    T = bank.temperature
    stats = _Stats(n_own, k, T, own.device)
    mm_dtype = torch.bfloat16 if precision == "bf16" else own.dtype
    rows_of = torch.arange(n_own, device=own.device)
    for s_lo, srows in _ring_slices(bank):
        srows_mm = srows.to(mm_dtype)
        width = min(chunk, n_own)
        sims_buf = torch.empty(width, len(srows), dtype=mm_dtype, device=own.device)
        logit_buf = sims_buf if mm_dtype == own.dtype else torch.empty(width, len(srows), device=own.device)
        scratch = torch.empty_like(logit_buf)
        search = _FaissSlice(srows, s_lo) if backend == "faiss" else None
        for a in range(0, n_own, chunk):
            r = slice(a, min(a + chunk, n_own))
            c = r.stop - r.start
            q = own[r]
            sims = torch.matmul(q.to(mm_dtype), srows_mm.T, out=sims_buf[:c])   # (c, n_slice)
            if search is not None:
                v, i = search.candidates(q, k, bank.lo + a)
            else:
                # Exclude each row's own column from its neighbours (not from its entropy).
                self_col = bank.lo + rows_of[r] - s_lo
                inside = ((self_col >= 0) & (self_col < len(srows))).nonzero()[:, 0]
                self_sims = sims[inside, self_col[inside]].clone()
                sims[inside, self_col[inside]] = float("-inf")
                v, i = _block_candidates(sims, q, srows, k, precision)
                sims[inside, self_col[inside]] = self_sims
                i = i + s_lo
            stats.add_candidates(r, v.float(), i)
            logits = logit_buf[:c].copy_(sims) if logit_buf is not sims_buf else sims
            stats.add_logits(r, logits.mul_(1.0 / T), scratch[:c])
            if progress is not None:
                progress(c)
    entropy = dist.all_gather_rows(stats.entropy(), bank.sizes)
    neighbours = dist.all_gather_rows(stats.top_i, bank.sizes)
    return Neighbourhood(entropy.cpu(), neighbours.cpu())
