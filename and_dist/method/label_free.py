"""Neighbourhood quality without labels, measured at every discovery, for data nobody labelled.

Consistency (diagnostics.py) needs labels. These three need none, and each asks something a
true neighbour should pass:
  mutual_rate      i's nearest neighbour has i as its own nearest neighbour;
  view_agreement   the nearest bank row to a fresh feature of another augmented view of i (i's
                   own row left out) is the bank's neighbour of i: measured on a fixed sample of
                   discovery.view_sample rows, since it costs a forward pass per sample;
  round_stability  the share of i's neighbours that the previous discovery found too.
Each is reported over all samples, for anchors and the rest, and by entropy decile, as the
consistency is, so on labelled data the two kinds sit side by side.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..platform import dist
from .diagnostics import mean_or_none, by_entropy_bins

MEASURES = ("mutual_rate", "view_agreement", "round_stability")
VIEW_CHUNK = 128      # samples a view draw and a forward pass cover


def mutual(neighbours: torch.Tensor) -> torch.Tensor:
    """(N,) float64: 1 where i's nearest neighbour has i as its nearest, else 0."""
    first = neighbours[:, 0]
    valid = first >= 0
    back = first.clamp(min=0)
    return ((neighbours[back, 0] == torch.arange(len(first))) & valid).double()


def kept(previous: torch.Tensor | None, neighbours: torch.Tensor) -> torch.Tensor:
    """(N,) float64: each sample's share of neighbours the previous discovery also gave it;
    NaN everywhere at the first discovery."""
    if previous is None or previous.shape != neighbours.shape:
        return torch.full((len(neighbours),), float("nan"), dtype=torch.float64)
    same = (neighbours[:, :, None] == previous[:, None, :]).any(2) & (neighbours >= 0)
    return same.double().mean(1)


def view_sample(n: int, size: int, seed: int) -> torch.Tensor:
    """The fixed sample of rows view agreement is measured on (the same at every discovery)."""
    g = torch.Generator().manual_seed(seed * 7919 + 34)
    return torch.randperm(n, generator=g)[: min(size, n)].sort().values


@torch.no_grad()
def view_neighbours(model, data, bank, sample: torch.Tensor, seed: int, round_: int, dtype) -> torch.Tensor:
    """The nearest bank row (self excluded) to a fresh feature (eval mode) of another augmented
    view of each sampled row, the same on every rank. The sample is cut into fixed chunks, each
    with its own augmentation draw, and the ranks share every chunk; the bank stays sharded."""
    from ..data.sampler import seed_of
    rank, world = dist.rank_world()
    was_training = model.training
    model.eval()
    out = []
    try:
        for c, a in enumerate(range(0, len(sample), VIEW_CHUNK)):
            chunk = sample[a: a + VIEW_CHUNK]
            lo, hi = dist.shard_range(len(chunk), world, rank)
            g = torch.Generator().manual_seed(seed_of(seed, round_, c, 34))
            f = model(data.views(chunk, g, lo, hi - lo).to(dtype)).float() if hi > lo else \
                torch.empty(0, bank.dim, device=bank.device)
            f = dist.all_gather_rows(f, dist.shard_sizes(len(chunk), world))        # (chunk, D)
            sims = f.to(bank.rows) @ bank.rows.T                                     # own bank slice
            own = (chunk >= bank.lo) & (chunk < bank.hi)
            rows = torch.nonzero(own.to(sims.device))[:, 0]
            sims[rows, chunk.to(sims.device)[rows] - bank.lo] = float("-inf")
            v, i = sims.float().max(1)
            i = i + bank.lo
            if world > 1:
                v = dist.all_gather_rows(v[None].contiguous(), [1] * world)          # (world, chunk)
                i = dist.all_gather_rows(i[None].contiguous(), [1] * world)
                i = i.gather(0, v.argmax(0, keepdim=True))[0]
            out.append(i.cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


@dataclass
class LabelFree:
    per_sample: dict                    # measure -> (N,) float64, NaN where not measured
    sample_size: int                    # rows view agreement was measured on
    seconds: dict = field(default_factory=dict)   # measure -> its cost

    def summary(self, entropy: torch.Tensor, anchor: torch.Tensor, bins: int = 10) -> dict:
        """Flat metrics: each measure over all rows, anchors, the rest and by entropy decile."""
        out = {"view_sample": self.sample_size}
        for name, values in self.per_sample.items():
            out[name] = mean_or_none(values)
            out[f"anchor_{name}"] = mean_or_none(values[anchor])
            out[f"rest_{name}"] = mean_or_none(values[~anchor])
            out.update({f"decile{d + 1}_{name}": v for d, v in enumerate(by_entropy_bins(entropy, values, bins))})
            out[f"{name}_seconds"] = self.seconds.get(name)
        return out


def measure(neighbours: torch.Tensor, previous: torch.Tensor | None, views=None) -> LabelFree:
    """The three measures of one discovery. `views(sample) -> nearest rows` runs the view
    search (view_neighbours bound to the trainer's model and data); `sample` picks its rows."""
    per, seconds = {}, {}
    t = time.perf_counter()
    per["mutual_rate"] = mutual(neighbours)
    seconds["mutual_rate"] = time.perf_counter() - t
    size = 0
    if views is not None:
        t = time.perf_counter()
        sample, found = views()
        agree = torch.full((len(neighbours),), float("nan"), dtype=torch.float64)
        agree[sample] = (found == neighbours[sample, 0]).double()
        per["view_agreement"], size = agree, len(sample)
        seconds["view_agreement"] = time.perf_counter() - t
    t = time.perf_counter()
    per["round_stability"] = kept(previous, neighbours)
    seconds["round_stability"] = time.perf_counter() - t
    return LabelFree(per, size, seconds)
