"""The data types every side shares, light (no torch at import). What the trainer consumes
(`TrainData`): for a (round, epoch, step), this rank's augmented images, the global batch's sample
indices (bank rows) and labels; and, for evaluation, test-transformed images of any index range of
a split. Implementations: `cached.CachedData` (small images decoded once into memory, an
`ImageSet` per split, which the sources fill) and the streaming loaders."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

if TYPE_CHECKING:                      # light: the launcher and the sources read these types without torch
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


@dataclass
class ImageSet:
    """A decoded split. Row i of `images` is global sample i (its memory-bank row)."""
    images: torch.Tensor                     # uint8 (N, H, W, 3), contiguous
    labels: torch.Tensor                     # int64 (N,); only for evaluation, never for training
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) left out
    files: list[str] = field(default_factory=list)   # row i's file; empty for sources without files

    def __len__(self) -> int:
        return len(self.labels)

    def info(self) -> SplitInfo:
        return SplitInfo(self.labels, self.classes, self.skipped, self.files.__getitem__ if self.files else None)


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
