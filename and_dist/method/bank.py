"""The memory bank: one L2-normalised feature per training image, sharded by index range.

Rank r owns rows [lo, hi) of the N x D bank, so no rank holds all of ImageNet's 1.28M rows; the
loss (loss.py) and discovery (discovery.py) work shard by shard and combine exactly across ranks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..platform import dist
from ..platform.errors import UserError

INIT_BLOCK = 65536  # rows drawn per seeded block, so the initial bank is the same for any world size


class ShardedBank:
    """This rank's slice of the N x D bank of L2-normalised features."""

    def __init__(self, n: int, dim: int, *, momentum: float = 0.5, seed: int = 0,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.n, self.dim = n, dim
        self.momentum = momentum
        rank, world = dist.rank_world()
        self.lo, self.hi = dist.shard_range(n, world, rank)
        self.sizes = dist.shard_sizes(n, world)
        rows = self._random_rows(seed)
        # one spare row past the end, where `update` sends the rows other ranks own
        self._store = torch.cat([rows, rows.new_zeros(1, dim)]).to(device, dtype)
        self.rows = self._store[:-1]
        # staleness: the update count at each row's last update (-1: never, still its random start);
        # a row used at discovery is `updates - updated` steps old
        self.updates = 0
        self._updated_store = torch.full((len(self.rows) + 1,), -1, dtype=torch.long, device=device)
        self.updated = self._updated_store[:-1]

    def _random_rows(self, seed: int) -> torch.Tensor:
        """Random unit vectors for rows [lo, hi), drawn in global seeded blocks."""
        parts = []
        for start in range(self.lo - self.lo % INIT_BLOCK, self.hi, INIT_BLOCK):
            g = torch.Generator().manual_seed(seed * 1_000_003 + start // INIT_BLOCK)
            block = torch.randn(min(INIT_BLOCK, self.n - start), self.dim, generator=g)
            parts.append(block[max(self.lo - start, 0): self.hi - start])
        rows = torch.cat(parts) if parts else torch.empty(0, self.dim)
        return F.normalize(rows, dim=1)

    @property
    def device(self) -> torch.device:
        return self.rows.device

    def owned(self, idx: torch.Tensor) -> torch.Tensor:
        return (idx >= self.lo) & (idx < self.hi)

    @torch.no_grad()
    def update(self, idx: torch.Tensor, feats: torch.Tensor) -> None:
        """v_i <- normalise(m v_i + (1 - m) f_i) for the rows of `idx` this rank owns.

        `idx`/`feats` are the whole global batch: updates are routed by index, so it does not
        matter which rank computed which sample.
        """
        store, updated = self.rows, self.updated
        if dist.active():  # others' rows go to the spare row: fixed shapes, so no host sync
            rows, store = torch.where(self.owned(idx), idx - self.lo, len(self.rows)), self._store
            updated = self._updated_store
        else:
            rows = idx
        mixed = self.momentum * store[rows] + (1 - self.momentum) * feats.to(store)
        store[rows] = F.normalize(mixed, dim=1)
        self.updates += 1
        updated[rows] = self.updates

    # Checkpoint owner, sharded: each rank saves its slice with its global range; loading takes
    # every saved slice and copies the overlap with this rank's range, so any world size resumes.
    sharded = True

    def state_dict(self) -> dict:
        return {"lo": self.lo, "hi": self.hi, "n": self.n, "rows": self.rows.cpu(), "updated": self.updated.cpu(),
                "updates": self.updates}

    def load_state_dict(self, parts) -> None:
        for part in parts:
            if part["n"] != self.n:
                raise UserError(f"the checkpoint's memory bank has {part['n']} rows but this data set has "
                                f"{self.n} samples: it was made on other data; start a fresh run")
            self.load_rows(part["lo"], part["rows"], part.get("updated"))   # older checkpoints: no ages
            self.updates = part.get("updates", 0)

    def load_rows(self, lo: int, rows: torch.Tensor, updated: torch.Tensor | None = None) -> None:
        """Copy whatever part of global rows [lo, lo + len(rows)) falls in this rank's slice."""
        a, b = max(lo, self.lo), min(lo + len(rows), self.hi)
        if a < b:
            self.rows[a - self.lo: b - self.lo] = rows[a - lo: b - lo].to(self.rows)
            if updated is not None:
                self.updated[a - self.lo: b - self.lo] = updated[a - lo: b - lo].to(self.updated)

    def ages(self) -> torch.Tensor:
        """(N,) int64 on the CPU, every rank: updates since each row's last update; -1 for rows never
        updated (still random)."""
        updated = dist.all_gather_rows(self.updated, self.sizes).cpu()
        return torch.where(updated < 0, -1, self.updates - updated)


def age_summary(ages: torch.Tensor, steps_per_epoch: int) -> dict:
    """How stale the rows a discovery used were: median and 90th percentile of their age in
    steps and in epochs (rows never updated left out and counted)."""
    seen = ages[ages >= 0].double()
    out = {"bank_never_updated": int((ages < 0).sum())}
    for name, q in (("median", 0.5), ("p90", 0.9)):
        steps = torch.quantile(seen, q).item() if len(seen) else None
        out[f"bank_age_{name}_steps"] = steps
        out[f"bank_age_{name}_epochs"] = None if steps is None else steps / max(1, steps_per_epoch)
    return out
