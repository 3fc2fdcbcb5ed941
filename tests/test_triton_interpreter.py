"""The two Triton kernels (fused_attention.py, fused_discovery.py) on CPU, through Triton's
interpreter (TRITON_INTERPRET=1), against float64 references and the exact discovery path.

The interpreter decides at `@triton.jit` time, so the kernels run in a fresh process that has
TRITON_INTERPRET=1 from the start: this file itself, run as a script (`_run_kernels` below). It
saves the kernels' outputs; the tests here rebuild the (seeded) inputs, compute the references and
compare.

The interpreter multiplies bf16 wrong (it keeps bf16 as raw uint16 and np.matmul's the bit
patterns), so both modules' half type (HALF_TL, HALF_DTYPE) is swapped for float16: bf16x3 becomes fp16x3, which has the
same structure (hi + lo split, three products) and is, if anything, more accurate. Tolerances
are set from that: tight enough that a wrong mask, a missing rescale or an off-by-one block
fails by orders of magnitude.
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

try:
    import triton  # noqa: F401
except ImportError as e:
    pytest.skip(f"Triton is not importable ({e}): these tests run the GPU kernels through Triton's CPU "
                "interpreter (pip install triton, the version torch pins)", allow_module_level=True)

HERE = Path(__file__).parent

# fused_attention, at the loss's scale 1/T
DIM, N_Q, N_K, T_ATT = 32, 70, 200, 0.07       # 70 queries: 2 query blocks of 64, the last ragged
SPLITS = (1, 2, 4)        # key blocks of 256, 128, 64 keys (64-key tiles): the last tile/block ragged
# fused_discovery
N_BANK, DIM_BANK, T_DISC, K, CHUNK = 300, 32, 0.1, 3, 130   # chunks of 130 > BLOCK_M=128; k=3 pads to KP=4
PRECISIONS = ("bf16x3", "fp32", "bf16")
FOREIGN = dict(q=(0, 150), slice=(100, 300))    # queries against another rank's slice (ring step)


def _attention_inputs():
    """Unit keys; 30 random queries (spread softmax) and 40 near keys, 10 of them in the ragged
    last tile (one key dominates its block, and the running max jumps when its tile comes)."""
    g = torch.Generator().manual_seed(0)
    rows = F.normalize(torch.randn(N_K, DIM, generator=g), dim=1)
    near = torch.cat([torch.randint(0, N_K, (30,), generator=g), torch.arange(N_K - 10, N_K)])
    q = torch.cat([torch.randn(N_Q - 40, DIM, generator=g),
                   rows[near] + 0.5 * torch.randn(40, DIM, generator=g) / math.sqrt(DIM)])
    return F.normalize(q, dim=1), rows


def _run_kernels(out: str) -> None:
    """In the TRITON_INTERPRET=1 process: every kernel launch of the tests, saved to `out`."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from and_dist.method import discovery
    from and_dist.method.kernels import fused_attention, fused_discovery
    from and_dist.method.bank import ShardedBank

    for kernel in (fused_attention._attention_kernel, fused_discovery._discovery_kernel):
        assert isinstance(kernel, InterpretedFunction), "run with TRITON_INTERPRET=1 set before the import"
    fused_attention.HALF_TL = tl.float16
    fused_discovery.HALF_DTYPE = torch.float16
    discovery.fused_available = lambda device: True      # let discover() take kernel=fused on CPU

    res = {"attention_module": fused_attention.__file__, "BLOCK_N": fused_attention.BLOCK_N}
    q, rows = _attention_inputs()
    for splits in SPLITS:
        for exact_out in (True, False):
            res["lse_out", splits, exact_out] = fused_attention.lse_out(q, rows, 1 / T_ATT, splits=splits,
                                                                        exact_out=exact_out)
    bank = ShardedBank(N_BANK, DIM_BANK, seed=7)
    for precision in PRECISIONS:
        got = discovery.discover(bank, T_DISC, k=K, chunk=CHUNK, kernel="fused", precision=precision)
        res["discover", precision] = got.entropy, got.neighbours
    (q_lo, q_hi), (s_lo, s_hi) = FOREIGN["q"], FOREIGN["slice"]
    for precision in ("bf16x3", "fp32"):
        ops = fused_discovery.split_rows(bank.rows, precision)
        q_ops = tuple(None if x is None else x[q_lo:q_hi] for x in ops)
        k_ops = tuple(None if x is None else x[s_lo:s_hi] for x in ops)
        res["block_stats", precision] = fused_discovery.block_stats(q_ops, k_ops, T_DISC, K, q_lo - s_lo, s_lo,
                                                                    precision)
    torch.save(res, out)


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    out = tmp_path_factory.mktemp("triton_interpreter") / "kernels.pt"
    path = os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout
    res = torch.load(out)
    assert Path(res["attention_module"]).parent == HERE.parent / "and_dist" / "method" / "kernels"   # this tree's kernels
    return res


def _keys_per_block(kernels, splits: int) -> int:
    """lse_out's key blocks: whole tiles of BLOCK_N keys, about N_K / splits of them."""
    bn = kernels["BLOCK_N"]
    return max(bn, math.ceil(N_K / splits / bn) * bn)


def _attention_reference(q, rows, per):
    """float64 (lse, softmax @ rows) of every block of `per` keys, stacked (S, n_q[, D])."""
    lse, out = [], []
    for a in range(0, len(rows), per):
        logits = q.double() @ rows[a: a + per].double().T / T_ATT
        lse.append(logits.logsumexp(1))
        out.append(logits.softmax(1) @ rows[a: a + per].double())
    return torch.stack(lse), torch.stack(out)


@pytest.mark.slow
@pytest.mark.parametrize("exact_out", [True, False])
@pytest.mark.parametrize("splits", SPLITS)
def test_lse_out_blocks_match_float64(kernels, splits, exact_out):
    lse, out = kernels["lse_out", splits, exact_out]
    q, rows = _attention_inputs()
    per = _keys_per_block(kernels, splits)
    blocks = math.ceil(N_K / per)
    assert lse.shape == (blocks, N_Q) and out.shape == (blocks, N_Q, DIM)
    ref_lse, ref_out = _attention_reference(q, rows, per)
    assert (lse - ref_lse).abs().max() < 1e-5                    # ~3e-6 seen; lse ~ 5..15
    # fp16x3 weights: float32-accurate (~3e-7 seen); one fp16 product of the weights: ~2.4e-4
    assert (out - ref_out).abs().max() < (2e-6 if exact_out else 1e-3)


@pytest.mark.slow
def test_lse_out_exact_out_is_the_accurate_one(kernels):
    q, rows = _attention_inputs()
    ref_out = _attention_reference(q, rows, _keys_per_block(kernels, 2))[1]
    err = {x: (kernels["lse_out", 2, x][1] - ref_out).abs().max() for x in (True, False)}
    assert err[True] < err[False] / 10


@pytest.mark.slow
@pytest.mark.parametrize("splits", SPLITS)
def test_lse_out_blocks_combine_to_the_whole_softmax(kernels, splits):
    from and_dist.method.kernels.attention import combine_blocks
    lse, out = combine_blocks(*kernels["lse_out", splits, True], torch.float32)
    q, rows = _attention_inputs()
    ref_lse, ref_out = _attention_reference(q, rows, N_K)
    assert (lse - ref_lse[0]).abs().max() < 1e-5
    assert (out - ref_out[0]).abs().max() < 2e-6


def _exact_entropy(rows: torch.Tensor, T: float) -> torch.Tensor:
    logp = (rows.double() @ rows.double().T / T).log_softmax(1)
    return -(logp.exp() * logp).sum(1)


@pytest.fixture(scope="module")
def exact_discovery():
    from and_dist.method.bank import ShardedBank
    from and_dist.method.discovery import discover
    bank = ShardedBank(N_BANK, DIM_BANK, seed=7)
    return bank, _exact_entropy(bank.rows, T_DISC), discover(bank, T_DISC, k=K, chunk=CHUNK, kernel="exact")


@pytest.mark.slow
@pytest.mark.parametrize("precision", PRECISIONS)
def test_fused_discovery_matches_exact(kernels, exact_discovery, precision):
    entropy, neighbours = kernels["discover", precision]
    _, truth, ref = exact_discovery
    assert (ref.entropy - truth).abs().max() < 2e-5                # the reference itself (float32 maths)
    assert truth.max() - truth.min() > 0.1                         # entropies that can be told apart
    # fp16x3 / fp32: ~5e-6 seen; "bf16" runs as one fp16 product here: ~2e-3 seen
    assert (entropy - truth).abs().max() < (2e-5 if precision != "bf16" else 1e-2), precision
    assert neighbours.shape == (N_BANK, K)
    assert not (neighbours == torch.arange(N_BANK)[:, None]).any(), "a row is its own neighbour"
    assert all(len(set(r)) == K for r in neighbours.tolist()), "a neighbour twice"
    assert ((neighbours >= 0) & (neighbours < N_BANK)).all()
    same = (neighbours == ref.neighbours).all(1).double().mean()
    assert same > (0.9 if precision == "bf16" else 0.999), (precision, same)


@pytest.mark.slow
def test_fused_discovery_precision_order(kernels, exact_discovery):
    truth = exact_discovery[1]
    err = {p: (kernels["discover", p][0] - truth).abs().max() for p in PRECISIONS}
    assert err["bf16x3"] < err["bf16"] / 10                        # why the split is the default


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16x3", "fp32"])
def test_block_stats_on_another_slice(kernels, exact_discovery, precision):
    """Queries [0, 150) against bank slice [100, 300): global indices offset by the slice's start,
    self excluded only for the 50 queries inside the slice."""
    s, t, top_v, top_i = kernels["block_stats", precision]
    bank = exact_discovery[0]
    (q_lo, q_hi), (s_lo, s_hi) = FOREIGN["q"], FOREIGN["slice"]
    sims = bank.rows[q_lo:q_hi].double() @ bank.rows[s_lo:s_hi].double().T
    e = torch.exp((sims - 1) / T_DISC)
    assert ((s - e.sum(1)).abs() / e.sum(1)).max() < 1e-5
    assert (t - (e * sims / T_DISC).sum(1)).abs().max() < 1e-5 * e.sum(1).max() / T_DISC
    own = torch.arange(q_lo, q_hi)
    inside = (own >= s_lo) & (own < s_hi)
    sims[inside.nonzero()[:, 0], own[inside] - s_lo] = float("-inf")
    ref_v, ref_i = sims.topk(K, dim=1)
    order = top_v.argsort(1, descending=True)                    # the kernel's slots are unordered
    assert torch.equal(top_i.gather(1, order), ref_i + s_lo)
    assert (top_v.gather(1, order) - ref_v).abs().max() < 1e-6


if __name__ == "__main__":
    _run_kernels(sys.argv[1])
