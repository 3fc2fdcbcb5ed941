"""The bank's softmax as fused attention: queries against keys = values = a bank shard.

With unit rows v_j and logits l_ij = q_i . v_j / T, attention with scale 1/T returns exactly the
two per-shard numbers the AND loss needs (loss.py): the logsumexp LSE_i and the output
O_i = sum_j softmax(l_i)_j v_j. A fused kernel computes them tile by tile, so no (queries x N)
logit block is ever stored. Entropy has the same form: H_i = LSE_i - q_i . O_i / T.

Kernels: on CPU PyTorch's flash kernel (float32/float64); on CUDA with Triton our split-KV
kernel (fused_attention.py: bf16x3 products, float32-accurate, ~2.5x PyTorch's), else PyTorch's
memory-efficient kernel, which keeps float32. A shard of 1.28M keys against 256 queries is only
two query tiles, so the keys are cut into blocks run as a batch and the blocks' (LSE, O) pairs
are combined exactly, as across ranks (split-KV).
"""
from __future__ import annotations

import importlib
import math

import torch

from ..loss import ShardTerms, empty_terms, positive_logits, positive_terms, shard_terms

MIN_BLOCK = {"cuda": 1024, "cpu": 8192}   # keys per block; below this a block is all overhead


def supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a fused kernel takes this device and dtype (else the exact path is used)."""
    if device.type == "cuda":
        return dtype in (torch.float32, torch.bfloat16, torch.float16)
    return device.type == "cpu" and dtype in (torch.float32, torch.float64)


def _parallel_tasks(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return torch.get_num_threads()


def _kernel(q: torch.Tensor, k: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, L, D) queries against (B, 1, S, D) keys = values -> out (B, L, D), lse (B, L)."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, k, 0.0, False, attn_mask=None, scale=scale)
    elif q.dtype == torch.float32:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, k, None, True, 0.0, False, scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, k, 0.0, False, False, scale=scale)[:2]
    return out[:, 0], lse[:, 0, : q.shape[2]].float()


def triton_available(device: torch.device, kernel: str = "fused_attention") -> bool:
    """Whether the Triton kernel module `kernel` (this package) can run on `device`: CUDA with
    bf16 tensor cores (compute capability 8.0+, Ampere on); older cards take the other paths."""
    device = torch.device(device)
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        return False
    try:
        importlib.import_module(f"{__package__}.{kernel}")
        return True
    except ImportError:
        return False


def attention_lse_out(queries: torch.Tensor, rows: torch.Tensor, scale: float,
                      block: int | None = None, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """logsumexp_j(scale q_i . v_j) (GB,) and sum_j softmax_ij v_j (GB, D) over all `rows`,
    in the queries' dtype (float32 accumulation at least). impl: sdpa (PyTorch's kernels),
    triton (fused_attention.py, CUDA float32), auto = triton where it runs."""
    if impl == "triton" or (impl == "auto" and rows.dtype == torch.float32 and triton_available(rows.device)):
        from .fused_attention import lse_out
        lse, out = lse_out(queries, rows, scale)
        return combine_blocks(lse, out, queries.dtype)
    gb, d = queries.shape
    n = len(rows)
    if block is None:
        block = max(MIN_BLOCK[rows.device.type], math.ceil(n / _parallel_tasks(rows.device)))
    nb = n // block if n >= block else 0
    parts_lse, parts_out = [], []
    if nb:
        keys = rows[: nb * block].reshape(nb, 1, block, d)
        out, lse = _kernel(queries[None, None].expand(nb, 1, gb, d), keys, scale)
        parts_lse.append(lse)
        parts_out.append(out)
    if nb * block < n:
        out, lse = _kernel(queries[None, None], rows[nb * block:][None, None], scale)
        parts_lse.append(lse)
        parts_out.append(out)
    return combine_blocks(torch.cat(parts_lse), torch.cat(parts_out), queries.dtype)


def combine_blocks(lse: torch.Tensor, out: torch.Tensor, dtype: torch.dtype):
    """Exact merge of key blocks' (lse (B, GB), out (B, GB, D)) pairs, as across ranks."""
    if len(lse) == 1:
        return lse[0].to(dtype), out[0].to(dtype)
    total = torch.logsumexp(lse, 0)
    w = torch.exp(lse - total)                                   # each block's share
    return total.to(dtype), torch.einsum("bl,bld->ld", w.to(out.dtype), out).to(dtype)


def shard_terms_attention(queries: torch.Tensor, rows: torch.Tensor, lo: int, positives: torch.Tensor,
                          temperature: float, impl: str = "auto") -> ShardTerms:
    """`loss.shard_terms` with the normaliser and weighted mean from a fused attention kernel;
    the positives' part (a handful per query) is the shared exact code."""
    if len(rows) == 0:
        return empty_terms(queries, positives)
    if not supported(rows.device, rows.dtype):
        return shard_terms(queries, rows, lo, positives, temperature)
    lse, out = attention_lse_out(queries.to(rows.dtype), rows, 1.0 / temperature, impl=impl)
    pos, cols, mine = positive_logits(queries, rows, lo, positives, temperature, from_logits=False)
    pos_lse, pos_out = positive_terms(pos, cols, mine, rows)
    return ShardTerms(lse.to(queries.dtype), out.to(queries.dtype), pos_lse, pos_out)


def attention_entropy(queries: torch.Tensor, rows: torch.Tensor, temperature: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query against `rows`: (LSE, mean logit q . O / T), both float64. Entropy is
    LSE - mean logit; over several slices, combine with `combine_entropy`."""
    lse, out = attention_lse_out(queries, rows, 1.0 / temperature)
    mean_logit = (queries * out).sum(1) / temperature
    return lse.double(), mean_logit.double()


def combine_entropy(lse: torch.Tensor, mean_logit: torch.Tensor) -> torch.Tensor:
    """Entropy over the union of slices from per-slice (LSE, mean logit), stacked (slices, rows)."""
    total = torch.logsumexp(lse, 0)
    return total - (torch.exp(lse - total) * mean_logit).sum(0)


def select_shard_fn(kernel: str, device: torch.device):
    """bank.kernel -> the per-shard function: auto = attention on CUDA, exact on CPU."""
    if kernel == "attention" or (kernel == "auto" and torch.device(device).type == "cuda"):
        return shard_terms_attention
    return shard_terms
