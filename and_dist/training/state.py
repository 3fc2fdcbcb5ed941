"""The run's own small checkpoint owners: where it is and what it has measured (Progress), its
random-number streams (RNG), and the config it was started with (RunConfig)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..platform.errors import UserError


@dataclass
class Progress:
    """The next step to run, the per-round table and the per-epoch kNN record."""
    round: int = 0
    epoch: int = 0
    step: int = 0
    global_step: int = 0
    epoch_loss: float = 0.0          # sum over this epoch's finished steps, for its mean
    rounds: list = field(default_factory=list)
    best: dict = field(default_factory=dict)
    last_knn: list | None = None
    seconds: float = 0.0             # training time of the finished segments of the run
    segments: int = 0

    def next_round(self) -> None:
        self.round, self.epoch, self.step = self.round + 1, 0, 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, s: dict) -> None:
        for k, v in s.items():
            setattr(self, k, v)


class RNG:
    """torch's global CPU generator and this process's CUDA one (everything else is seeded from
    (seed, position)). One CUDA state, not one per visible GPU: a run resumes on fewer GPUs."""

    def state_dict(self) -> dict:
        return {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None}

    def load_state_dict(self, s: dict) -> None:
        torch.set_rng_state(s["cpu"])
        cuda = s.get("cuda")
        if isinstance(cuda, list):                 # older checkpoints: one state per visible GPU
            cuda = cuda[0] if cuda else None
        if cuda is not None and torch.cuda.is_initialized():
            torch.cuda.set_rng_state(cuda)


class RunConfig:
    """The config a checkpoint was made with; resuming with another data set or architecture is
    refused with both named."""
    KEYS = (("data", "source"), ("data", "root"), ("model", "arch"), ("model", "low_dim"))

    def __init__(self, config: dict):
        self.config = config

    def state_dict(self) -> dict:
        return {"config": self.config}

    def load_state_dict(self, s: dict) -> None:
        old = s["config"]
        for section, key in self.KEYS:
            a, b = old[section][key], self.config[section][key]
            if a != b:
                raise UserError(f"the checkpoint was made with {section}.{key}={a!r}, this run has "
                                f"{section}.{key}={b!r}; start a fresh run or use the same setting")
