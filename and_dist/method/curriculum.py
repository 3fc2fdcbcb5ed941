"""The AND curriculum: how many anchors each round makes, which samples they are, and each
query's positive set. Also the checkpoint owner of the discovered neighbourhood."""
from __future__ import annotations

import torch

from .discovery import Neighbourhood


def anchor_count(round_: int, n: int, rate: float) -> int:
    """Round r makes round(N x rate x r) samples anchors (capped at N); rate 0 makes none."""
    return min(n, int(round(n * rate * round_)))


def select_anchors(entropy: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of the `count` lowest-entropy samples (ties broken by lower index)."""
    order = torch.sort(entropy, stable=True).indices
    mask = torch.zeros(len(entropy), dtype=torch.bool)
    mask[order[:count]] = True
    return mask


def consistency(anchor: torch.Tensor, neighbours: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Share of anchor-neighbour pairs with the same true label (a diagnostic, never trained on);
    None when there are no anchors."""
    if not anchor.any():
        return None
    nbr = neighbours[anchor]
    return (labels[nbr] == labels[anchor][:, None]).double().mean().item()


def positive_sets(idx: torch.Tensor, anchor: torch.Tensor | None,
                  neighbours: torch.Tensor | None) -> torch.Tensor:
    """(B, 1 + k) global indices of each query's positives: itself, plus its neighbours if it is an
    anchor; -1 pads the rows of non-anchors. Round 0 (no discovery yet) is (B, 1)."""
    if anchor is None:
        return idx[:, None]
    nbrs = neighbours[idx].to(idx)
    nbrs = torch.where(anchor[idx].to(idx.device)[:, None], nbrs, torch.full_like(nbrs, -1))
    return torch.cat([idx[:, None], nbrs], dim=1)


class Curriculum:
    """This round's neighbourhood and anchors (None in round 0); a checkpoint owner."""

    def __init__(self, rate: float, method: str = "and"):
        self.rate = 0.0 if method == "instance" else rate
        self.nbhd: Neighbourhood | None = None
        self.anchor: torch.Tensor | None = None
        self._on = None

    def set_round(self, round_: int, nbhd: Neighbourhood) -> int:
        """Pick this round's anchors from a fresh discovery; returns their number."""
        count = anchor_count(round_, len(nbhd.entropy), self.rate)
        self.nbhd, self.anchor, self._on = nbhd, select_anchors(nbhd.entropy, count), None
        return count

    def positives(self, idx: torch.Tensor) -> torch.Tensor:
        if self.anchor is None:
            return idx[:, None]
        if self._on is None or self._on[0].device != idx.device:    # one copy per round on the device
            self._on = (self.anchor.to(idx.device), self.nbhd.neighbours.to(idx.device))
        return positive_sets(idx, *self._on)

    def anchors(self) -> int:
        return int(self.anchor.sum()) if self.anchor is not None else 0

    def consistency(self, labels: torch.Tensor) -> float | None:
        return None if self.anchor is None else consistency(self.anchor, self.nbhd.neighbours, labels)

    def state_dict(self) -> dict:
        n = self.nbhd
        return {"entropy": n.entropy if n else None, "neighbours": n.neighbours if n else None,
                "anchor": self.anchor}

    def load_state_dict(self, s: dict) -> None:
        if s["entropy"] is not None:
            self.nbhd, self.anchor, self._on = Neighbourhood(s["entropy"], s["neighbours"]), s["anchor"], None
