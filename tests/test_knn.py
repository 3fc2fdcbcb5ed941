"""Weighted kNN (Wu et al. 2018), query by query, against a loop written from its definition:
the k most similar train rows vote exp(sim / sigma) for their class. The data are clustered and k
is small, so one neighbour more or fewer changes many queries' votes (checked below, so the test
keeps its power)."""
import pytest
import torch
import torch.nn.functional as F

from and_dist.eval.knn import knn_accuracy, knn_predict


def reference_predict(queries, train, labels, num_classes, k, sigma):
    """(Q, 5) classes by falling vote; -1 where a class got no vote (their order is arbitrary)."""
    out = []
    for q in queries:
        sims = [(float(q @ t), int(c)) for t, c in zip(train, labels)]
        votes = [0.0] * num_classes
        for sim, c in sorted(sims, reverse=True)[:k]:
            votes[c] += torch.exp(torch.tensor(sim / sigma, dtype=torch.float64)).item()
        out.append([c if votes[c] > 0 else -1 for c in sorted(range(num_classes), key=lambda c: -votes[c])[:5]])
    return torch.tensor(out)


@pytest.fixture(scope="module")
def clusters():
    g = torch.Generator().manual_seed(7)
    centers = F.normalize(torch.randn(6, 16, generator=g), dim=1)
    labels = torch.randint(0, 6, (240,), generator=g)
    qlabels = torch.randint(0, 6, (60,), generator=g)
    train = F.normalize(centers[labels] + 0.7 * torch.randn(240, 16, generator=g), dim=1).double()
    queries = F.normalize(centers[qlabels] + 0.7 * torch.randn(60, 16, generator=g), dim=1).double()
    return queries, qlabels, train, labels


@pytest.mark.parametrize("k", [1, 4, 9])
def test_every_querys_ranking_equals_the_definition(clusters, k):
    queries, qlabels, train, labels = clusters
    ref = reference_predict(queries, train, labels, 6, k, 0.1)
    got = knn_predict(queries, train, labels, 6, k=k, sigma=0.1, chunk=7)
    assert torch.equal(torch.where(ref >= 0, got, -1), ref)
    # the data can tell k from k +- 1: a vote over one neighbour more or fewer ranks classes otherwise
    for other in (k - 1, k + 1):
        if other >= 1:
            assert (reference_predict(queries, train, labels, 6, other, 0.1) != ref).any()


def test_accuracy_counts_the_queries_whose_first_or_any_top5_class_is_theirs(clusters):
    queries, qlabels, train, labels = clusters
    ref = reference_predict(queries, train, labels, 6, 60, 0.1)
    assert (ref >= 0).all()                      # every top-5 class was voted for: no arbitrary ties
    top1 = 100 * (ref[:, 0] == qlabels).double().mean().item()
    top5 = 100 * (ref == qlabels[:, None]).any(1).double().mean().item()
    assert knn_accuracy(queries, qlabels, train, labels, 6, k=60, sigma=0.1) == pytest.approx((top1, top5))
    assert 40 < top1 < 100 and top5 > top1       # informative data: neither chance nor perfect


def test_sigma_weights_the_votes(clusters):
    """Another sigma ranks classes otherwise, and as the definition says."""
    queries, _, train, labels = clusters
    ref = reference_predict(queries, train, labels, 6, 9, 0.03)
    assert (ref != reference_predict(queries, train, labels, 6, 9, 0.1)).any()
    got = knn_predict(queries, train, labels, 6, k=9, sigma=0.03)
    assert torch.equal(torch.where(ref >= 0, got, -1), ref)
