"""The attention fast path against the exact path: AND loss and gradient at world sizes 1-3
(real gloo processes, split-KV combination across ranks), attention-form entropy, discovery
kernels, memory-aware chunks; on CUDA (when present) the GPU kernels too."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import WORKERS, free_port
import torch
import torch.nn.functional as F

from and_dist.platform import memory
from and_dist.platform.errors import UserError
from and_dist.method.kernels.attention import attention_entropy, attention_lse_out, combine_entropy, select_shard_fn
from and_dist.method.bank import ShardedBank
from and_dist.method.discovery import discover
from and_dist.method.loss import shard_terms

HERE = Path(__file__).parent
sys.path.insert(0, str(WORKERS))
from attention_worker import T, loss_and_grad, problem  # noqa: E402

CUDA = torch.cuda.is_available()
TOL = {"float64": 1e-6, "float32": 2e-5}   # the CPU kernel's logsumexp is float32-accurate


def exact_entropy(rows: torch.Tensor, T: float) -> torch.Tensor:
    logp = (rows.double() @ rows.double().T / T).log_softmax(1)
    return -(logp.exp() * logp).sum(1)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("block", [None, 97])
def test_attention_normaliser_and_mean_row(dtype, block):
    g = torch.Generator().manual_seed(0)
    rows = F.normalize(torch.randn(1000, 64, generator=g, dtype=getattr(torch, dtype)), dim=1)
    q = F.normalize(torch.randn(40, 64, generator=g, dtype=rows.dtype), dim=1)
    lse, out = attention_lse_out(q, rows, 1 / 0.07, block=block)
    logits = q.double() @ rows.double().T / 0.07
    assert (lse - logits.logsumexp(1)).abs().max() < TOL[dtype] * 10
    assert (out - logits.softmax(1) @ rows.double()).abs().max() < TOL[dtype]



@pytest.fixture(scope="module", params=["float64", "float32"])
def single(request):
    """World size 1 in this process: the exact path is the reference."""
    bank, positives, feats = problem(getattr(torch, request.param))
    return request.param, {name: loss_and_grad(bank, positives, feats, fn)
                           for name, fn in (("exact", shard_terms), ("attention", select_shard_fn("attention", "cpu")))}


def test_attention_loss_and_gradient_match_exact(single):
    dtype, r = single
    (l_ex, g_ex), (l_at, g_at) = r["exact"], r["attention"]
    assert (l_at - l_ex).abs().max() < TOL[dtype] * 5
    assert (g_at - g_ex).abs().max() < TOL[dtype]
    assert g_ex.abs().max() > 0.1                       # a real gradient, not zeros


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_split_kv_over_ranks_matches_one_process(single, tmp_path, world):
    dtype, r = single
    out = tmp_path / "r.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
           f"--master_port={free_port()}", str(WORKERS / "attention_worker.py"), dtype, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout
    got = torch.load(out, weights_only=True)
    l_ref, g_ref = r["exact"]
    for name in ("exact", "attention"):
        losses, grad = got[name]
        assert (losses - l_ref).abs().max() < TOL[dtype] * 5, name
        assert (grad - g_ref).abs().max() < TOL[dtype], name
    bank = problem(getattr(torch, dtype))[0]
    truth = exact_entropy(bank.rows, T)
    sims = bank.rows.double() @ bank.rows.double().T
    truth_nbrs = sims.fill_diagonal_(float("-inf")).topk(2, dim=1).indices     # brute force, self excluded
    one = discover(bank, T, k=2, chunk=100, kernel="exact")                         # this process, one rank
    assert torch.equal(one.neighbours, truth_nbrs)
    for kernel in ("exact", "attention"):
        entropy, neighbours = got[f"discover-{kernel}"]
        assert (entropy - truth).abs().max() < 1e-4, kernel
        assert torch.equal(neighbours, truth_nbrs), kernel


def test_attention_entropy_matches_exact_and_combines_over_slices():
    bank = ShardedBank(900, 32, seed=2, dtype=torch.float64)
    rows = bank.rows
    truth = exact_entropy(rows, 0.1)
    lse, mean_logit = attention_entropy(rows, rows, 0.1)
    assert (lse - mean_logit - truth).abs().max() < 1e-6
    parts = [attention_entropy(rows, rows[a:b], 0.1) for a, b in ((0, 300), (300, 301), (301, 900))]
    split = combine_entropy(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
    assert (split - truth).abs().max() < 1e-6
    assert truth.max() - truth.min() > 0.01              # entropies that can be told apart


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_discovery_attention_kernel_matches_exact(backend):
    bank = ShardedBank(1500, 32, seed=7)
    ref = discover(bank, 0.1, k=3, chunk=200, kernel="exact")
    got = discover(bank, 0.1, k=3, chunk="auto", kernel="attention", backend=backend)
    assert (got.entropy - ref.entropy).abs().max() < 2e-5
    assert torch.equal(got.neighbours, ref.neighbours)


def test_auto_chunk_follows_the_memory_budget():
    per_row, fixed = 4 * 100_000, 10 * 2**20
    small = memory.auto_chunk(per_row, fixed, "cpu", rows=10**6, budget=200 * 2**20)
    large = memory.auto_chunk(per_row, fixed, "cpu", rows=10**6, budget=2000 * 2**20)
    assert small == int((memory.USABLE * 200 * 2**20 - fixed) // per_row)
    assert 1 <= small < large <= memory.MAX_AUTO_CHUNK
    assert memory.auto_chunk(per_row, fixed, "cpu", rows=7, budget=2**30) == 7
    assert memory.auto_chunk(per_row, 0, "cpu", rows=10**6) >= 1          # measured free RAM


def test_explicit_chunk_too_large_fails_in_one_line_with_the_largest_that_fits():
    per_row = 4 * 100_000
    with pytest.raises(UserError) as e:
        memory.resolve_chunk(5000, per_row, 0, "cpu", rows=10**6, budget=100 * 2**20)
    fit = memory.largest_chunk(per_row, 0, "cpu", budget=100 * 2**20)
    msg = str(e.value)
    assert "\n" not in msg and f"{fit} rows fit" in msg and f"chunk={fit} " in msg and "chunk=5000" in msg
    assert memory.resolve_chunk(fit, per_row, 0, "cpu", rows=10**6, budget=100 * 2**20) == fit
    with pytest.raises(UserError, match="not even one row"):
        memory.auto_chunk(per_row, 0, "cpu", rows=10, budget=1000)


def test_discover_clips_an_explicit_chunk_to_the_rows_there_are():
    bank = ShardedBank(2000, 16)
    assert len(discover(bank, 0.1, k=1, chunk=10**9).entropy) == 2000


# ------------------------------------------------------------------------------------ CUDA only

cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (the GPU kernels)")


@cuda
@pytest.mark.parametrize("dtype,impl", [(torch.float32, "triton"), (torch.float32, "sdpa"), (torch.bfloat16, "sdpa")])
def test_cuda_attention_kernels(dtype, impl):
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = F.normalize(torch.randn(300_001, 128, generator=g, device="cuda"), dim=1)
    q = F.normalize(torch.randn(256, 128, generator=g, device="cuda"), dim=1)
    lse, out = attention_lse_out(q.to(dtype), rows.to(dtype), 10.0, impl=impl)
    logits = q.double() @ rows.double().T * 10
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    assert (lse.double() - logits.logsumexp(1)).abs().max() < tol * 10
    assert (out.double() - logits.softmax(1) @ rows.double()).abs().max() < tol


@cuda
def test_cuda_fused_discovery_matches_exact():
    from and_dist.method.discovery import fused_available
    assert fused_available("cuda"), "Triton is missing on this CUDA machine"
    bank = ShardedBank(20_000, 128, seed=3, device="cuda")
    truth = exact_entropy(bank.rows, 0.1).cpu()
    ref = discover(bank, 0.1, k=3, kernel="exact")
    errors = {}
    for precision, tol in (("bf16x3", 3e-4), ("fp32", 2e-5), ("bf16", 0.1)):
        got = discover(bank, 0.1, k=3, kernel="fused", precision=precision)
        errors[precision] = (got.entropy - truth).abs().max().item()
        assert errors[precision] < tol, precision
        same = (got.neighbours == ref.neighbours).all(1).double().mean()
        assert same > (0.999 if precision != "bf16" else 0.5), (precision, same)
    assert errors["bf16x3"] < errors["bf16"] / 10      # why bf16x3 is the default
    assert math.isfinite(ref.entropy.sum().item())
