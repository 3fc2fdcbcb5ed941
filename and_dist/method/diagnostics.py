"""AND's own argument measured on the user's data: a sample whose similarity distribution over
the bank has low entropy more often has neighbours of its own class, so the lowest-entropy
samples make the safest anchors. The true labels serve this diagnostic only (never training).

Computed at every discovery from the neighbourhood discover() returns, which is the same on
every rank, and the full label vector every rank holds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def has_labels(labels: torch.Tensor | None, n: int) -> bool:
    """True when there is one label per sample and at least two classes (one class folder
    holding every image is how an unlabelled set is given)."""
    return labels is not None and len(labels) == n and bool((labels != labels[0]).any())


def sample_consistency(neighbours: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) float64: each sample's share of neighbours with its own label (missing neighbours,
    -1, are not counted; a sample without any gets NaN)."""
    valid = neighbours >= 0
    same = (labels[neighbours.clamp(min=0)] == labels[:, None]) & valid
    return same.sum(1).double() / valid.sum(1).double()


def entropy_order(entropy: torch.Tensor) -> torch.Tensor:
    """Sample indices from the lowest entropy up, ties by lower index (as anchors are picked)."""
    return torch.sort(entropy, stable=True).indices


def by_entropy_bins(entropy: torch.Tensor, values: torch.Tensor, bins: int = 10) -> list[float | None]:
    """Mean of `values` over equal slices of the entropy ranking (deciles for bins=10): bin b holds
    ranks [b N / bins, (b + 1) N / bins), lowest entropy in bin 0; an empty bin is None."""
    ranked = values[entropy_order(entropy)]
    n = len(ranked)
    edges = [b * n // bins for b in range(bins + 1)]
    return [mean_or_none(ranked[lo:hi]) for lo, hi in zip(edges, edges[1:])]


def chance(labels: torch.Tensor) -> float:
    """Probability that another sample drawn at random has the same label."""
    counts = torch.bincount(labels - labels.min()).double()
    n = counts.sum()
    return ((counts * (counts - 1)).sum() / (n * (n - 1))).item()


def mean_or_none(x: torch.Tensor) -> float | None:
    x = x[~torch.isnan(x)]
    return x.mean().item() if len(x) else None


@dataclass
class Diagnosis:
    per_sample: torch.Tensor        # (N,) consistency, in sample order
    order: torch.Tensor             # (N,) sample indices by entropy rank
    deciles: list                   # mean consistency per entropy decile, lowest entropy first
    anchors: float | None           # mean over the anchors (None without anchors)
    rest: float | None              # mean over the others (None when every sample is an anchor)
    all: float | None
    chance: float
    count: int                      # anchors

    def metrics(self) -> dict:
        """Flat numeric fields, for metrics.jsonl and wandb alike."""
        out = {"anchors": self.count, "anchor_consistency": self.anchors, "rest_consistency": self.rest,
               "all_consistency": self.all, "chance_consistency": self.chance}
        out.update({f"decile{d + 1}_consistency": v for d, v in enumerate(self.deciles)})
        return out


def diagnose(entropy: torch.Tensor, neighbours: torch.Tensor, anchor: torch.Tensor,
             labels: torch.Tensor | None, bins: int = 10) -> Diagnosis | None:
    """The diagnostic of one discovery; None when the set has no labels."""
    entropy, neighbours, anchor = entropy.cpu(), neighbours.cpu(), anchor.cpu()
    if not has_labels(labels, len(entropy)):
        return None
    labels = labels.cpu()
    per = sample_consistency(neighbours, labels)
    return Diagnosis(per, entropy_order(entropy), by_entropy_bins(entropy, per, bins),
                     mean_or_none(per[anchor]), mean_or_none(per[~anchor]), mean_or_none(per), chance(labels),
                     int(anchor.sum()))
