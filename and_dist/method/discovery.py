"""Neighbourhood discovery: each sample's softmax entropy over the whole bank and its k nearest
neighbours (itself excluded), from one pass over blocks of bank similarities.

Three kernels compute the same statistics (`kernel`):
  exact      (chunk x slice) similarity blocks with torch matmul: the reference, any device.
  attention  entropy as attention (H = LSE - q.O/T, kernels/attention.py) plus a separate kNN search
             (faiss, or chunked matmul + top-k); with faiss no similarity block is stored.
  fused      one Triton kernel on CUDA doing both tile by tile (kernels/fused_discovery.py).
auto = fused on CUDA when Triton is there (attention when backend=faiss), exact otherwise.
`chunk` = rows per block; `auto` sizes it from the free memory (memory.py).

Sharded: every rank holds one bank slice and computes the statistics of its own rows; the slices
travel round a ring so each rank sees every slice once, holding at most two slices and one
(chunk x slice) block of similarities. Entropy is accumulated with a fixed shift in
float64, so the result does not depend on how the bank is cut into slices and chunks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as tdist

from ..platform import dist, memory
from .kernels.attention import attention_entropy, triton_available
from .bank import ShardedBank

from .choices import resolve_kernel


@dataclass
class Neighbourhood:
    entropy: torch.Tensor      # (N,) float64, entropy of each row's softmax over the bank
    neighbours: torch.Tensor   # (N, k) int64, nearest rows by cosine similarity, self excluded
    kernel: str = ""           # what computed them (discover's resolved kernel and precision)
    precision: str = ""


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

    def add_sums(self, r: slice, s: torch.Tensor, t: torch.Tensor) -> None:
        """Fold in a block's sums computed elsewhere (attention or the fused kernel), float64."""
        self.s[r] += s
        self.t[r] += t

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


def fused_available(device) -> bool:
    return triton_available(device, "fused_discovery")


def _chunk(chunk, kernel: str, precision: str, backend: str, bank: ShardedBank) -> int:
    """Rows per block: the (chunk x slice) blocks a kernel allocates, against the free memory left
    once the ring's second slice (and any converted copies) are counted."""
    width, n_own = max(bank.sizes), len(bank.rows)
    slice_bytes = width * bank.dim * bank.rows.element_size()
    fixed = slice_bytes * (2 if dist.active() else 1)
    if kernel == "fused":
        per_row = 64
        if chunk in (None, 0, "auto"):
            sms = torch.cuda.get_device_properties(bank.device).multi_processor_count
            chunk = 8 * sms * 128
    elif kernel == "attention":
        tasks = torch.cuda.get_device_properties(bank.device).multi_processor_count * 4 \
            if bank.device.type == "cuda" else torch.get_num_threads()
        per_row = 2 * tasks * bank.dim * 4                        # the key blocks' outputs
        if backend != "faiss":                                    # + the kNN similarity block
            per_row += width * (4 if precision == "fp32" else 6)
    else:
        per_row = width * (8 if precision == "fp32" else 14)  # block + scratch (+ bf16 and float copies)
    return memory.resolve_chunk(chunk, per_row, fixed, bank.device, n_own, what="discovery.chunk")


@torch.no_grad()
def discover(bank: ShardedBank, temperature: float, *, k: int = 1, chunk: int | str = "auto",
             backend: str = "torch", precision: str = "auto", progress=None, kernel: str = "auto") -> Neighbourhood:
    """Entropy (of each row's softmax over the bank at `temperature`) and k nearest neighbours of
    every bank row; the result is replicated on all ranks.

    progress: optional callable(n_done) advanced once per finished row chunk (rank 0 shows a bar).
    """
    kernel, precision = resolve_kernel(kernel, precision, backend, fused_available(bank.device))
    chunk = _chunk(chunk, kernel, precision, backend, bank)
    stats = _Stats(len(bank.rows), k, temperature, bank.device)
    one_pass = _Pass(bank, stats, k, chunk, precision, backend, temperature, progress)
    slice_step = getattr(one_pass, kernel)
    for s_lo, srows in _ring_slices(bank):
        slice_step(s_lo, srows)
    entropy = dist.all_gather_rows(stats.entropy(), bank.sizes)
    neighbours = dist.all_gather_rows(stats.top_i, bank.sizes)
    return Neighbourhood(entropy.cpu(), neighbours.cpu(), kernel, precision)


@dataclass
class _Pass:
    """One pass of discovery over the ring of bank slices: what every kernel's step reads. Each
    step folds one slice's contribution to this rank's rows (in chunks of rows) into `stats`."""
    bank: ShardedBank
    stats: _Stats
    k: int
    chunk: int
    precision: str
    backend: str
    temperature: float
    progress: object = None
    own_split: tuple | None = None           # the fused kernel's split of this rank's rows, made once

    def _chunks(self):
        n_own = len(self.bank.rows)
        for a in range(0, n_own, self.chunk):
            yield a, slice(a, min(a + self.chunk, n_own))

    def _done(self, r: slice) -> None:
        if self.progress is not None:
            self.progress(r.stop - r.start)

    def exact(self, s_lo: int, srows: torch.Tensor) -> None:
        """The reference: one (chunk x slice) block of similarities per row chunk, reused."""
        bank, own = self.bank, self.bank.rows
        mm_dtype = torch.bfloat16 if self.precision == "bf16" else own.dtype
        rows_of = torch.arange(len(own), device=own.device)
        srows_mm = srows.to(mm_dtype)
        width = min(self.chunk, len(own))
        sims_buf = torch.empty(width, len(srows), dtype=mm_dtype, device=own.device)
        logit_buf = sims_buf if mm_dtype == own.dtype else torch.empty(width, len(srows), device=own.device)
        scratch = torch.empty_like(logit_buf)
        search = _FaissSlice(srows, s_lo) if self.backend == "faiss" else None
        for a, r in self._chunks():
            c = r.stop - r.start
            q = own[r]
            sims = torch.matmul(q.to(mm_dtype), srows_mm.T, out=sims_buf[:c])   # (c, n_slice)
            if search is not None:
                v, i = search.candidates(q, self.k, bank.lo + a)
            else:
                v, i = _torch_candidates(sims, q, srows, self.k, self.precision, bank.lo + rows_of[r] - s_lo)
                i = i + s_lo
            self.stats.add_candidates(r, v.float(), i)
            logits = logit_buf[:c].copy_(sims) if logit_buf is not sims_buf else sims
            self.stats.add_logits(r, logits.mul_(1.0 / self.temperature), scratch[:c])
            self._done(r)

    def attention(self, s_lo: int, srows: torch.Tensor) -> None:
        """Entropy sums from a fused attention kernel (float32), neighbours from faiss or from a
        (chunk x slice) similarity block in `precision`."""
        bank, own = self.bank, self.bank.rows
        rows_of = torch.arange(len(own), device=own.device)
        search = _FaissSlice(srows, s_lo) if self.backend == "faiss" else None
        mm_dtype = torch.bfloat16 if self.precision == "bf16" else own.dtype
        srows_mm = srows.to(mm_dtype)
        for a, r in self._chunks():
            q = own[r]
            lse, mean_logit = attention_entropy(q, srows, self.temperature)
            s = torch.exp(lse - self.stats.shift)
            self.stats.add_sums(r, s, s * mean_logit)
            if search is not None:
                v, i = search.candidates(q, self.k, bank.lo + a)
            else:
                sims = q.to(mm_dtype) @ srows_mm.T
                v, i = _torch_candidates(sims, q, srows, self.k, self.precision, bank.lo + rows_of[r] - s_lo)
                i = i + s_lo
            self.stats.add_candidates(r, v.float(), i)
            self._done(r)

    def fused(self, s_lo: int, srows: torch.Tensor) -> None:
        """Entropy sums and top-k from the fused Triton kernel, `chunk` rows per launch."""
        from .kernels.fused_discovery import block_stats, split_rows
        bank = self.bank
        if self.own_split is None:
            self.own_split = split_rows(bank.rows, self.precision)
        keys = self.own_split if s_lo == bank.lo else split_rows(srows, self.precision)
        for a, r in self._chunks():
            q = tuple(None if x is None else x[r] for x in self.own_split)
            s, t, v, i = block_stats(q, keys, self.temperature, self.k, bank.lo + a - s_lo, s_lo, self.precision)
            self.stats.add_sums(r, s, t)
            self.stats.add_candidates(r, v, i)
            self._done(r)


def _torch_candidates(sims, q, srows, k, precision, self_col):
    """Top-k columns of a similarity block with each row's own column excluded (restored after)."""
    inside = ((self_col >= 0) & (self_col < len(srows))).nonzero()[:, 0]
    self_sims = sims[inside, self_col[inside]].clone()
    sims[inside, self_col[inside]] = float("-inf")
    v, i = _block_candidates(sims, q, srows, k, precision)
    sims[inside, self_col[inside]] = self_sims
    return v, i
