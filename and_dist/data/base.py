"""What the trainer consumes: for a (round, epoch, step), this rank's augmented images, the global
batch's sample indices (bank rows) and labels; and, for evaluation, test-transformed images of
any index range of a split. Implementations: `cached.CachedData` (small images decoded once into
memory) and the streaming loaders."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import torch


@dataclass
class Batch:
    images: torch.Tensor    # (b, 3, S, S) float, augmented and normalised, on the device
    index: torch.Tensor     # (GB,) global sample indices of the whole global batch, rank order
    sizes: list[int]        # rows per rank of the global batch; this rank's are index[offset:offset+b]
    labels: torch.Tensor    # (b,) labels of this rank's images (diagnostics only, never trained on)


@dataclass
class SplitInfo:
    labels: torch.Tensor                    # (N,) int64, on the CPU
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (path, reason), left out
    path: Callable[[int], str] | None = None   # sample i's file (None: the source has no files, e.g. demo)

    def __len__(self) -> int:
        return len(self.labels)


class TrainData(Protocol):
    train: SplitInfo
    test: SplitInfo

    def steps(self, round_: int, epoch: int) -> int:
        """Number of steps of the epoch."""

    def batches(self, round_: int, epoch: int, start: int = 0) -> Iterator[Batch]:
        """The epoch's steps from `start` on."""

    def eval_images(self, split: str, lo: int, hi: int) -> Iterator[torch.Tensor]:
        """Test-transformed images of samples [lo, hi) of 'train' or 'test', in order, on the device."""

    def views(self, index: torch.Tensor, generator: torch.Generator, offset: int, count: int) -> torch.Tensor:
        """Train samples index[offset:offset+count] augmented as for training, with the draws of
        all of `index` from `generator` (so a sample's view does not depend on how many ranks
        share `index`): float (count, 3, S, S) on the device (label-free view agreement)."""

    def pictures(self, index: torch.Tensor) -> torch.Tensor:
        """uint8 (len(index), H, W, 3) thumbnails of train samples, for the run's pictures."""
