"""`data.loader=torch`: a torch DataLoader whose `data.workers` processes decode with PIL.

Why keep it next to DALI: it needs nothing beyond PIL, so it runs wherever DALI does not (and is
the reference DALI is measured against, benchmarks/input_pipeline.py). Each worker gets
(path, crop box) keys planned by stream.StreamData and returns size x size uint8 crops; JPEGs are
decoded at the smallest DCT scale that still leaves the crop at least `size` pixels (PIL's draft),
which is much faster and changes the pixels only like any antialiased downscale.
"""
from __future__ import annotations

from collections import deque
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .sources.folder import to_rgb
from .sources.index import FileIndex
from .stream import StepPlan, StreamData


def decode_for_crop(path, box: tuple[int, int, int, int], size: int):
    """The stored image decoded at the smallest DCT scale that leaves the crop >= size px, and the
    crop box (left, top, right, bottom) in its pixels."""
    top, left, h, w = box
    with Image.open(path) as img:
        width, height = img.size
        img.draft("RGB", (-(-width * size // w), -(-height * size // h)))
        sx, sy = img.size[0] / width, img.size[1] / height
        return to_rgb(img), (left * sx, top * sy, (left + w) * sx, (top + h) * sy)


def resize_crop(img: Image.Image, scaled: tuple, size: int) -> np.ndarray:
    """The box `scaled` of a decoded image resized to size x size, RGB uint8."""
    return np.array(img.resize((size, size), Image.BILINEAR, box=scaled), dtype=np.uint8)


def load_crop(path, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Pixels (top, left, height, width) of the stored image, resized to size x size, RGB uint8."""
    return resize_crop(*decode_for_crop(path, box, size), size)


def load_centre(path, resize: int, size: int) -> np.ndarray:
    """The test transform: shorter side resized to `resize`, centre crop size x size, RGB uint8."""
    with Image.open(path) as img:
        width, height = img.size
        scale = resize / min(width, height)
        nw, nh = max(resize, round(width * scale)), max(resize, round(height * scale))
        img.draft("RGB", (nw, nh))
        img = to_rgb(img).resize((nw, nh), Image.BILINEAR)
    top, left = (nh - size + 1) // 2, (nw - size + 1) // 2          # halves round up, as in DALI
    return np.array(img, dtype=np.uint8)[top:top + size, left:left + size]


class _Files(Dataset):
    """Keys are (split, i, top, left, height, width) for a training crop, (split, i) for evaluation;
    a split's index (file index or pack) says what PIL opens for sample i."""

    def __init__(self, index: dict, size: int, resize: int):
        self.index, self.size, self.resize = index, size, resize

    def __getitem__(self, key) -> torch.Tensor:
        split, i, *box = key
        source = self.index[split].source(i)
        x = load_crop(source, box, self.size) if box else load_centre(source, self.resize, self.size)
        return torch.from_numpy(np.ascontiguousarray(x))


class TorchData(StreamData):
    """Streaming data interface whose decoding runs in DataLoader worker processes."""

    def _loader(self, keys: Iterator[list]) -> DataLoader:
        return DataLoader(_Files(self.index, self.size, self.resize), batch_sampler=keys, num_workers=self.workers,
                          pin_memory=self.env.device.type == "cuda")

    def _decode_train(self, plans: Iterator[StepPlan]) -> Iterator[tuple[StepPlan, torch.Tensor]]:
        pending = deque()      # plans handed to the decoder, in order

        def keys():          # consumed ahead by the DataLoader, in step order
            for plan in plans:
                pending.append(plan)
                yield [("train", i, *box) for i, box in zip(plan.mine.tolist(), plan.boxes.tolist())]

        for images in self._loader(keys()):
            yield pending.popleft(), images

    def _decode_eval(self, index: FileIndex, chunks: list[list[int]]) -> Iterator[torch.Tensor]:
        split = "train" if index is self.index["train"] else "test"
        yield from self._loader([[(split, i) for i in chunk] for chunk in chunks if chunk])
