"""What one of our checkpoints holds, read in one place: the run's config, its progress, the
model's weights, the metrics log's state and the memory bank's saved slices. Everything that reads
a checkpoint it did not write itself (evaluate, probe, init_from, export, a resumed run's log, the
prober) goes through `RunState`, so the owner names a checkpoint is made of are known here, beside
the owners (training/trainer.py, eval/prober.py), and nowhere else."""
from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..platform.errors import UserError
from . import checkpoint

if TYPE_CHECKING:
    from ..config import Config

BANK = "bank"            # the memory bank's owner: one `bank-<rank>.pt` slice per rank that saved it


class RunState:
    """A verified checkpoint directory (`checkpoint.resolve` / `find_latest` give one). The
    replicated state (`state.pt`) is read at the first question that needs it, once."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @cached_property
    def state(self) -> dict:
        return checkpoint.read_state(self.path)

    def config(self) -> Config:
        """The config the run was made with."""
        from ..config import config_from_dict
        return config_from_dict(self.state["config"]["config"])

    @property
    def progress(self) -> dict:
        return self.state.get("progress", {})

    @property
    def global_step(self) -> int:
        return self.progress.get("global_step", 0)

    @property
    def weights(self) -> dict:
        """The model's state dict, without DistributedDataParallel's `module.` prefix."""
        return {k.removeprefix("module."): v for k, v in self.state["model"].items()}

    @property
    def log(self) -> dict | None:
        """The metrics log's state (lines written, wandb run id); None in checkpoints made before it."""
        return self.state.get("log")

    def restore(self, owners: dict) -> None:
        """Load `owners` from this checkpoint (checkpoint.load), reading `state.pt` no second time."""
        checkpoint.load(self.path, owners, self.state)

    def bank_files(self) -> list[Path]:
        return checkpoint.sharded_parts(self.path, BANK)

    def bank_rows(self) -> int | None:
        """The bank's N (rows = training images), None when the checkpoint holds no bank."""
        parts = self.bank_files()
        return torch.load(parts[0], map_location="cpu", weights_only=True, mmap=True)["n"] if parts else None

    def bank_slice(self, n: int, lo: int, hi: int) -> torch.Tensor | None:
        """Rows [lo, hi) of the memory bank, from whichever saved slices hold them; None when the
        checkpoint holds no bank. `n`: the data's sample count, which the bank must match."""
        rows = None
        for f in self.bank_files():
            part = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            if part["n"] != n:
                raise UserError(f"{self.path}: the memory bank has {part['n']} rows, the data {n} samples")
            if rows is None:
                rows = torch.zeros(hi - lo, part["rows"].shape[1], dtype=part["rows"].dtype)
            a, b = max(part["lo"], lo), min(part["lo"] + len(part["rows"]), hi)
            if a < b:
                rows[a - lo: b - lo] = part["rows"][a - part["lo"]: b - part["lo"]]
        return rows
