"""The AND core against naive reference implementations (single process)."""
import pytest
import torch
import torch.nn.functional as F

from and_dist.method.bank import INIT_BLOCK, ShardedBank
from and_dist.platform import dist
from and_dist.method.curriculum import positive_sets
from and_dist.method.loss import and_loss
from and_dist.method.curriculum import anchor_count, consistency, select_anchors
from and_dist.method.discovery import discover
from and_dist.eval.knn import knn_accuracy


def naive_discovery(bank_rows, temperature, k):
    """The released algorithm: softmax over the bank in chunks of 100 rows, entropy, then
    neighbours from the full similarity matrix with self excluded (float64 for a clean reference)."""
    v = bank_rows.double()
    entropy = torch.cat([
        -(p * p.log()).sum(1)
        for p in (torch.softmax(v[a:a + 100] @ v.T / temperature, 1) for a in range(0, len(v), 100))])
    sims = v @ v.T
    sims.fill_diagonal_(float("-inf"))
    return entropy, sims.topk(k, dim=1).indices


def naive_loss(feats, bank_rows, idx, anchor, neighbours, temperature):
    p = torch.softmax(feats @ bank_rows.T / temperature, 1)
    out = []
    for b, i in enumerate(idx.tolist()):
        pos = [i] + (neighbours[i].tolist() if anchor is not None and anchor[i] else [])
        out.append(-torch.log(p[b, pos].sum()))
    return torch.stack(out)


def test_bank_init_is_unit_and_update_follows_momentum_rule():
    m = 0.3                          # not 0.5, where m and 1 - m are the same number
    bank = ShardedBank(100, 16, momentum=m, seed=3)
    assert torch.allclose(bank.rows.norm(dim=1), torch.ones(100), atol=1e-6)
    before = bank.rows.clone()
    idx = torch.tensor([5, 17, 99])
    f = F.normalize(torch.randn(3, 16), dim=1)
    bank.update(idx, f)
    expect = F.normalize(m * before[idx] + (1 - m) * f, dim=1)
    assert torch.allclose(bank.rows[idx], expect, atol=1e-6)
    assert not torch.allclose(bank.rows[idx], F.normalize((1 - m) * before[idx] + m * f, dim=1), atol=1e-3)
    untouched = torch.ones(100, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(bank.rows[untouched], before[untouched])


def _rows_of_rank(n: int, dim: int, seed: int, world: int, rank: int) -> torch.Tensor:
    """The initial rows rank `rank` of `world` draws, without a process group (lo, hi set by hand)."""
    bank = ShardedBank.__new__(ShardedBank)
    bank.n, bank.dim = n, dim
    bank.lo, bank.hi = dist.shard_range(n, world, rank)
    return bank._random_rows(seed)


def test_bank_init_does_not_depend_on_world_size_or_block_cut():
    n = 150_000                                   # above INIT_BLOCK: rows come from 3 seeded blocks
    assert n > 2 * INIT_BLOCK
    whole = ShardedBank(n, 8, seed=1).rows
    for world in (2, 3):                          # shard edges (50,000, 100,000) cut inside the blocks
        parts = [_rows_of_rank(n, 8, 1, world, r) for r in range(world)]
        assert [len(p) for p in parts] == dist.shard_sizes(n, world)
        assert torch.equal(torch.cat(parts), whole), world
    assert not torch.allclose(ShardedBank(200, 8, seed=2).rows, ShardedBank(200, 8, seed=1).rows)
    assert torch.equal(ShardedBank(200, 8, seed=1).rows, whole[:200])


@pytest.mark.parametrize("with_anchors", [False, True])
def test_loss_and_gradient_match_naive(with_anchors):
    torch.manual_seed(0)
    n, d, b, k = 300, 16, 12, 2
    bank, T = ShardedBank(n, d, seed=1), 0.07
    idx = torch.randperm(n)[:b]
    anchor = neighbours = None
    if with_anchors:
        anchor = torch.zeros(n, dtype=torch.bool)
        anchor[idx[::2]] = True
        neighbours = torch.stack([torch.randperm(n)[:k] for _ in range(n)])
        neighbours = torch.where(neighbours == torch.arange(n)[:, None], (neighbours + 1) % n, neighbours)
    feats = F.normalize(torch.randn(b, d), dim=1).requires_grad_()
    objective, losses, _ = and_loss(feats, positive_sets(idx, anchor, neighbours), bank, [b], T)
    objective.backward()
    ours = feats.grad.clone()
    feats.grad = None
    ref = naive_loss(feats, bank.rows, idx, anchor, neighbours, T)
    ref.mean().backward()
    assert torch.allclose(losses, ref.detach(), atol=1e-5)
    assert torch.allclose(objective.detach(), ref.mean().detach(), atol=1e-5)
    assert torch.allclose(ours, feats.grad, atol=1e-5)
    if with_anchors:  # anchors' positive mass is larger, so their loss is lower than instance loss
        inst = naive_loss(feats.detach(), bank.rows, idx, None, None, T)
        assert (losses[::2] < inst[::2]).all()


def test_loss_is_stable_in_log_space():
    """Logits far apart (p_ii ~ e^-40) must not give inf: softmax-then-log would."""
    bank = ShardedBank(50, 4, seed=0)
    feats = -bank.rows[:4].clone().requires_grad_()
    _, losses, _ = and_loss(feats, positive_sets(torch.arange(4), None, None), bank, [4], 0.01)
    assert torch.isfinite(losses).all() and (losses > 50).all()


@pytest.mark.parametrize("backend,chunk,temperature", [("torch", 64, 0.05), ("torch", 10_000, 0.1), ("faiss", 97, 0.2)])
def test_discovery_matches_released_algorithm(backend, chunk, temperature):
    bank = ShardedBank(700, 16, seed=5)
    ref_entropy, ref_nbrs = naive_discovery(bank.rows, temperature, k=3)
    got = discover(bank, temperature, k=3, chunk=chunk, backend=backend)
    assert torch.allclose(got.entropy, ref_entropy, atol=1e-5)
    assert torch.equal(got.neighbours, ref_nbrs)
    for count in (0, 175, 350, 700):
        assert torch.equal(select_anchors(got.entropy, count), select_anchors(ref_entropy, count))


def test_discovery_bf16_finds_the_same_neighbours_mostly():
    bank = ShardedBank(700, 16, seed=5)
    exact = discover(bank, 0.1, k=1)
    fast = discover(bank, 0.1, k=1, precision="bf16")
    assert (fast.neighbours == exact.neighbours).float().mean() > 0.98
    assert torch.allclose(fast.entropy, exact.entropy, atol=0.2)


def test_curriculum_counts():
    assert [anchor_count(r, 50000, 0.25) for r in range(5)] == [0, 12500, 25000, 37500, 50000]
    assert anchor_count(3, 10, 0.25) == 8  # round(7.5) -> 8 (banker's rounding would say 8 too)
    assert anchor_count(9, 10, 0.25) == 10
    mask = select_anchors(torch.tensor([3.0, 1.0, 2.0, 1.0]), 2)
    assert mask.tolist() == [False, True, False, True]


def test_consistency():
    anchor = torch.tensor([True, True, False])
    nbrs = torch.tensor([[1], [2], [0]])
    labels = torch.tensor([0, 0, 1])
    assert consistency(anchor, nbrs, labels) == 0.5


def naive_knn(queries, qlabels, train, tlabels, classes, k, sigma):
    sims = queries @ train.T
    v, i = sims.topk(k, dim=1)
    votes = torch.zeros(len(queries), classes).scatter_add_(1, tlabels[i], torch.exp(v / sigma))
    pred = votes.argsort(1, descending=True)
    top1 = (pred[:, 0] == qlabels).double().mean().item() * 100
    top5 = (pred[:, :5] == qlabels[:, None]).any(1).double().mean().item() * 100
    return top1, top5


def test_knn_matches_naive():
    torch.manual_seed(0)
    centers = F.normalize(torch.randn(10, 32), dim=1)
    tl, ql = torch.randint(0, 10, (2000,)), torch.randint(0, 10, (300,))
    train = F.normalize(centers[tl] + 0.8 * torch.randn(2000, 32), dim=1)
    queries = F.normalize(centers[ql] + 0.8 * torch.randn(300, 32), dim=1)
    got = knn_accuracy(queries, ql, train, tl, 10, k=200, sigma=0.1, chunk=64)
    ref = naive_knn(queries, ql, train, tl, 10, 200, 0.1)
    assert got == pytest.approx(ref, abs=1e-9)
    assert 30 < got[0] < 100
