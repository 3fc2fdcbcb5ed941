"""Discovery's inner loop as one fused GPU kernel (Triton): for a block of rows against a bank
slice, the entropy sums and the running top-k neighbours, tile by tile, never storing the
(rows x slice) similarity block. Without it, discovery at N = 1.28M writes and rereads 1.6e12
similarities; with it, the work is the tensor-core matmul plus one exp per similarity.

Precision (`split`): one bf16 product moves entropies by ~1e-3, enough to reorder samples near
the anchor cut-off; "bf16x3" writes each float32 row as hi + lo bf16 parts and sums
hi.hi + hi.lo + lo.hi, which is float32-accurate (~1e-6 relative) at three bf16 products.
Sums use the fixed shift 1/T of discovery.py and Kahan compensation, so they are the same
float32 numbers however the bank is cut into ranks and chunks, up to rounding.

Import needs Triton (CUDA builds of PyTorch ship it); discovery.py imports this lazily.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

PRECISION_SPLITS = {"bf16": 0, "bf16x3": 1, "fp32": 2}
HALF_DTYPE = torch.bfloat16   # the tests swap in float16: Triton's CPU interpreter mis-multiplies bf16
BLOCK_M, BLOCK_N = 128, 64


@triton.jit
def _kahan(total, comp, x):
    y = x - comp
    t = total + y
    return t, (t - total) - y


@triton.jit
def _discovery_kernel(Q, QL, KB, KL, Sum, Tsum, TopV, TopI, n_q, n_k, self_offset, k_global0, c,
                      D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, K: tl.constexpr,
                      KP: tl.constexpr, SPLIT: tl.constexpr):
    """Rows [pid*BM, pid*BM+BM) of Q against all n_k rows of KB. c = log2(e) / T.
    self_offset: column of query row 0 in this slice (its own row is no neighbour)."""
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    rmask = rows < n_q
    d = tl.arange(0, D)
    q = tl.load(Q + rows[:, None] * D + d[None, :], mask=rmask[:, None], other=0.0)
    if SPLIT == 1:
        ql = tl.load(QL + rows[:, None] * D + d[None, :], mask=rmask[:, None], other=0.0)
    acc_s = tl.zeros([BM], tl.float32)
    cmp_s = tl.zeros([BM], tl.float32)
    acc_t = tl.zeros([BM], tl.float32)
    cmp_t = tl.zeros([BM], tl.float32)
    slot = tl.arange(0, KP)
    best_v = tl.where(slot[None, :] < K, float("-inf"), float("inf")) + tl.zeros([BM, KP], tl.float32)
    best_i = tl.full([BM, KP], -1, tl.int64)
    worst = tl.full([BM], float("-inf"), tl.float32)
    self_col = rows + self_offset
    for start in range(0, n_k, BN):
        cols = start + tl.arange(0, BN)
        cmask = cols < n_k
        kb = tl.load(KB + cols[:, None] * D + d[None, :], mask=cmask[:, None], other=0.0)
        if SPLIT == 1:
            kl = tl.load(KL + cols[:, None] * D + d[None, :], mask=cmask[:, None], other=0.0)
            s = tl.dot(ql, tl.trans(kb))
            s = tl.dot(q, tl.trans(kl), s)
            s = tl.dot(q, tl.trans(kb), s)
        elif SPLIT == 2:
            s = tl.dot(q, tl.trans(kb), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(kb))
        e = tl.where(cmask[None, :], tl.exp2((s - 1.0) * c), 0.0)   # exp(l - 1/T)
        acc_s, cmp_s = _kahan(acc_s, cmp_s, tl.sum(e, 1))
        acc_t, cmp_t = _kahan(acc_t, cmp_t, tl.sum(e * s, 1))
        s = tl.where(cmask[None, :] & (cols[None, :] != self_col[:, None]), s, float("-inf"))
        for _ in tl.static_range(K):
            m, j = tl.max(s, 1, return_indices=True, return_indices_tie_break_left=True)
            better = m > worst                    # strict: an equal value later has a higher index
            victim = tl.argmax(tl.where(best_v == worst[:, None], best_i, -2), 1, tie_break_left=True)
            hit = (slot[None, :] == victim[:, None]) & better[:, None]
            best_v = tl.where(hit, m[:, None], best_v)
            best_i = tl.where(hit, (start + j + k_global0).to(tl.int64)[:, None], best_i)
            worst = tl.min(best_v, 1)
            s = tl.where(cols[None, :] == (start + j)[:, None], float("-inf"), s)
    tl.store(Sum + rows, acc_s, mask=rmask)
    tl.store(Tsum + rows, acc_t, mask=rmask)
    out = rows[:, None] * K + slot[None, :]
    omask = rmask[:, None] & (slot[None, :] < K)
    tl.store(TopV + out, best_v, mask=omask)
    tl.store(TopI + out, best_i, mask=omask)


def split_rows(rows: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kernel's operands for float32 `rows`: bf16 (hi, lo) for bf16x3, (bf16, None) for bf16,
    (float32, None) for fp32."""
    if precision == "fp32":
        return rows.float().contiguous(), None
    hi = rows.to(HALF_DTYPE).contiguous()
    if precision == "bf16":
        return hi, None
    return hi, (rows.float() - hi.float()).to(HALF_DTYPE).contiguous()


def block_stats(q: tuple, keys: tuple, temperature: float, k: int, self_offset: int, k_global0: int,
                precision: str):
    """For every query row against every key row: s = sum exp(l - 1/T), t = sum exp(l - 1/T) l
    (float64, l the logit) and the top-k (value, global column) with self excluded."""
    qh, ql = q
    kh, kl = keys
    n_q, dim = qh.shape
    if dim & (dim - 1) or dim < 16:
        raise ValueError(f"the fused discovery kernel needs a power-of-two feature dim >= 16, got {dim}")
    dev = qh.device
    s = torch.empty(n_q, device=dev, dtype=torch.float32)
    t = torch.empty_like(s)
    top_v = torch.empty(n_q, k, device=dev, dtype=torch.float32)
    top_i = torch.empty(n_q, k, device=dev, dtype=torch.int64)
    kp = 1 << max(0, math.ceil(math.log2(k)))
    grid = (triton.cdiv(n_q, BLOCK_M),)
    _discovery_kernel[grid](qh, ql if ql is not None else qh, kh, kl if kl is not None else kh, s, t, top_v,
                            top_i, n_q, len(kh), self_offset, k_global0, math.log2(math.e) / temperature,
                            D=dim, BM=BLOCK_M, BN=BLOCK_N, K=k, KP=kp, SPLIT=PRECISION_SPLITS[precision],
                            num_warps=8, num_stages=2)
    return s.double(), t.double() / temperature, top_v, top_i
