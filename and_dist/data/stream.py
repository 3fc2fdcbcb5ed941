"""What the streaming loaders (dali.py, pil_stream.py) share: the plan of each step and its
augmentation, and the trainer's data interface over a decoder of files.

Why one plan for both: the trainer's sampler stays authoritative. A step's global batch comes from
sampler.global_batches(seed, round, epoch), and every random draw of the whole global batch (crop
box, colour jitter, grayscale, flip) from sampler.augment_generator(seed, round, epoch, step) and
the image sizes recorded in the file index. So the augmented global batch does not depend on the
number of ranks or on the loader, and a run resumes mid-epoch on the same trajectory. A decoder
only turns (file, crop box) into size x size uint8 pixels; colour, grayscale, flip and the
normalisation run batched on the training device with the in-memory path's own tensor ops.

Streamed images are normalised with the ImageNet mean/std.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from .augment import Augment, normalize, to_device, to_float
from .base import Batch
from .sources.index import FileIndex
from .sampler import augment_generator, global_batches, rank_slice

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class StepPlan:
    step: int
    index: torch.Tensor      # (GB,) the global batch's sample indices, rank order
    sizes: list[int]         # rows per rank
    mine: torch.Tensor       # (b,) this rank's sample indices
    boxes: torch.Tensor      # (b, 4) int64 crop boxes (top, left, height, width) in stored pixels
    colour: dict             # this rank's rows of the colour, grayscale and flip draws


class StreamAugment(Augment):
    """Augment for images of different sizes: crop boxes drawn per image (the decoder crops and
    resizes), then ColorJitter -> RandomGrayscale -> RandomHorizontalFlip -> Normalize batched on
    the decoded crops: the distribution of TrainAugment (torchvision's)."""

    def __init__(self, *args, mean=IMAGENET_MEAN, std=IMAGENET_STD, **kwargs):
        super().__init__(*args, mean=mean, std=std, **kwargs)

    def draw(self, hw: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Crop boxes (total, 4) int64 and colour draws of `total` images of sizes `hw` (total, 2)."""
        boxes, colour = self.draw_boxes(hw, generator)
        return boxes.long(), colour

    def __call__(self, images: torch.Tensor, p: dict) -> torch.Tensor:
        """uint8 (b, S, S, 3) crops on the device -> float (b, 3, S, S) augmented and normalised."""
        x = self.colour(to_float(images), p)
        if p["flip"].any():                        # the draws live on the CPU: no device sync
            x = torch.where(to_device(p["flip"], x.device).view(len(x), 1, 1, 1), x.flip(-1), x)
        return self.normalize(x)


def eval_resize(cfg) -> int:
    """Shorter side before the evaluation centre crop: data.eval_resize, else image_size * 256/224."""
    return cfg.data.eval_resize or round(cfg.data.image_size * 256 / 224)


class StreamData:
    """The trainer's data interface over files. Subclasses decode: `_decode_train` turns step plans
    into (plan, uint8 (b, S, S, 3) crops) in order, `_decode_eval` lists of samples into their
    test-transformed uint8 images (shorter side resized to `resize`, centre crop S)."""

    def __init__(self, train: FileIndex, test: FileIndex, cfg, env, eval_batch: int = 256):
        d, t = cfg.data, cfg.train
        self.index = {"train": train, "test": test}
        self.train, self.test = train.info(), test.info()
        self.env, self.batch_size, self.seed, self.eval_batch = env, t.batch_size, t.seed, eval_batch
        self.size, self.resize, self.workers = d.image_size, eval_resize(cfg), d.workers
        self.augment = StreamAugment(d.image_size, tuple(d.crop_scale), d.jitter, d.grayscale_p, d.flip,
                                     compiled=d.compile_augment)
        self.hw = torch.from_numpy(train.sizes)
        self._orders: dict = {}

    def _order(self, round_: int, epoch: int) -> list[torch.Tensor]:
        key = (round_, epoch)
        if key not in self._orders:           # one randperm of N per epoch, not per call
            self._orders = {key: global_batches(len(self.train), self.batch_size, self.env.world,
                                                self.seed, round_, epoch)}
        return self._orders[key]

    def steps(self, round_: int, epoch: int) -> int:
        return len(self._order(round_, epoch))

    def plans(self, round_: int, epoch: int, start: int = 0) -> Iterator[StepPlan]:
        order, env = self._order(round_, epoch), self.env
        for step in range(start, len(order)):
            idx = order[step]
            offset, sizes = rank_slice(len(idx), env.world, env.rank)
            boxes, colour = self.augment.draw(self.hw[idx], augment_generator(self.seed, round_, epoch, step))
            mine = slice(offset, offset + sizes[env.rank])
            yield StepPlan(step, idx, sizes, idx[mine], boxes[mine], {k: v[mine] for k, v in colour.items()})

    def batches(self, round_: int, epoch: int, start: int = 0) -> Iterator[Batch]:
        dev = self.env.device
        for plan, images in self._decode_train(self.plans(round_, epoch, start)):
            x = self.augment(images.to(dev, non_blocking=True), plan.colour)
            yield Batch(x, to_device(plan.index, dev), plan.sizes, self.train.labels[plan.mine])

    def views(self, index: torch.Tensor, generator: torch.Generator, offset: int, count: int) -> torch.Tensor:
        boxes, colour = self.augment.draw(self.hw[index], generator)
        most = -(-self.batch_size // self.env.world)        # a training step's rows: DALI's largest batch
        plans = [StepPlan(0, index, [count], index[a:b], boxes[a:b], {k: v[a:b] for k, v in colour.items()})
                 for a, b in ((a, min(a + most, offset + count)) for a in range(offset, offset + count, most))]
        return torch.cat([self.augment(images.to(self.env.device), plan.colour)
                          for plan, images in self._decode_train(iter(plans))])

    def eval_images(self, split: str, lo: int, hi: int) -> Iterator[torch.Tensor]:
        chunks = [list(range(a, min(a + self.eval_batch, hi))) for a in range(lo, hi, self.eval_batch)]
        for images in self._decode_eval(self.index[split], chunks):
            yield normalize(to_float(images.to(self.env.device, non_blocking=True)), IMAGENET_MEAN, IMAGENET_STD)

    def pictures(self, index: torch.Tensor) -> torch.Tensor:
        ids = index.tolist()
        chunks = [ids[a: a + self.eval_batch] for a in range(0, len(ids), self.eval_batch)]
        images = [x.cpu() for x in self._decode_eval(self.index["train"], chunks)]
        return torch.cat(images) if images else torch.empty(0, self.size, self.size, 3, dtype=torch.uint8)

    def _decode_train(self, plans: Iterator[StepPlan]) -> Iterator[tuple[StepPlan, torch.Tensor]]:
        raise NotImplementedError

    def _decode_eval(self, index: FileIndex, chunks: list[list[int]]) -> Iterator[torch.Tensor]:
        raise NotImplementedError

