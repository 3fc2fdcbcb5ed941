"""The loss's attention on CUDA as a Triton kernel, split over key blocks (split-KV).

PyTorch's memory-efficient kernel keeps float32 but runs it at about 45 TFLOP/s on an H100, so a
1.28M-row bank costs ~4 ms a step. Here the logits use the bf16x3 split of fused_discovery.py
(float32-accurate normaliser, three bf16 tensor-core products) and the weighted sum of rows
splits the softmax weights the same way (`exact_out`; one bf16 product instead is faster but
moves the gradient by ~1e-3 relative). Each program owns one block of keys and returns
its (max, sum, unnormalised output); `attention.combine_blocks` merges them exactly.

Import needs Triton; attention.py imports this lazily.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK_M, BLOCK_N = 64, 64
HALF_TL = tl.bfloat16   # the tests swap in float16: Triton's CPU interpreter mis-multiplies bf16


@triton.jit
def _split(x, HALF: tl.constexpr):
    """float32 -> bf16 (hi, lo) with hi + lo = x to ~2^-17 relative."""
    hi = x.to(HALF)
    return hi, (x - hi.to(tl.float32)).to(HALF)


@triton.jit
def _attention_kernel(Q, K, M, L, O, n_q, n_k, keys_per_split, scale,
                      D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HALF: tl.constexpr,
                      OUT_X3: tl.constexpr):
    """Queries [pid_m*BM, +BM) against keys [split*keys_per_split, +keys_per_split), float32 in
    memory, split to bf16 hi/lo in registers (no per-step copy of the bank)."""
    pid_m, split = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < n_q
    d = tl.arange(0, D)
    qh, ql = _split(tl.load(Q + rows[:, None] * D + d[None, :], mask=rmask[:, None], other=0.0), HALF)
    m = tl.full([BM], float("-inf"), tl.float32)
    total = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, n_k)
    for start in range(lo, hi, BN):
        cols = start + tl.arange(0, BN)
        cmask = cols < hi
        kh, kl = _split(tl.load(K + cols[:, None] * D + d[None, :], mask=cmask[:, None], other=0.0), HALF)
        s = tl.dot(ql, tl.trans(kh))
        s = tl.dot(qh, tl.trans(kl), s)
        s = tl.dot(qh, tl.trans(kh), s)
        s = tl.where(cmask[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        total = total * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if OUT_X3:                                   # weights and rows both split: float32-accurate
            ph, pl = _split(p, HALF)
            acc = tl.dot(pl, kh, acc)
            acc = tl.dot(ph, kl, acc)
            acc = tl.dot(ph, kh, acc)
        else:
            acc = tl.dot(p.to(HALF), kh, acc)
        m = m_new
    out = split * n_q + rows
    tl.store(M + out, m, mask=rmask)
    tl.store(L + out, total, mask=rmask)
    tl.store(O + out[:, None] * D + d[None, :], acc, mask=rmask[:, None])


def lse_out(queries: torch.Tensor, rows: torch.Tensor, scale: float, splits: int | None = None,
            exact_out: bool = True):
    """Per-block partials of logsumexp_j(scale q.v_j) and sum_j softmax_j v_j: (lse (S, GB),
    out (S, GB, D)) for S key blocks, float32."""
    n_q, dim = queries.shape
    if dim & (dim - 1) or dim < 16:
        raise ValueError(f"the fused attention kernel needs a power-of-two feature dim >= 16, got {dim}")
    if splits is None:
        splits = 2 * torch.cuda.get_device_properties(rows.device).multi_processor_count
    per = max(BLOCK_N, math.ceil(len(rows) / splits / BLOCK_N) * BLOCK_N)
    splits = math.ceil(len(rows) / per)
    dev = queries.device
    m = torch.empty(splits, n_q, device=dev)
    total = torch.empty_like(m)
    out = torch.empty(splits, n_q, dim, device=dev)
    grid = (triton.cdiv(n_q, BLOCK_M), splits)
    _attention_kernel[grid](queries.float().contiguous(), rows.contiguous(), m, total, out, n_q, len(rows), per, scale,
                            D=dim, BM=BLOCK_M, BN=BLOCK_N, HALF=HALF_TL, OUT_X3=exact_out, num_warps=4, num_stages=2)
    return m + torch.log(total), out / total[..., None]
