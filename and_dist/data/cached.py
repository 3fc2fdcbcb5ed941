"""Small-image data sets decoded once into memory as uint8, and the trainer's data interface over
them.

Why: AND keeps one memory-bank row per training image, so sample i must always be image i; holding
a small data set decoded in memory makes that trivial, lets augmentation run batched on tensors
(augment.py) and removes per-sample decoding from the training loop.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from ..platform import files
from ..platform.log import progress_bar
from .augment import TestTransform, TrainAugment, resize_center_crop, to_device
from .base import Batch, ImageSet
from .sources.folder import file_stamp, list_split, to_rgb
from .prefetch import prefetch
from .sampler import augment_generator, global_batches, rank_slice


# ------------------------------------------------------------------------- imagefolder decoding

def _cache_key(root: str, split: str, image_size: int, paths: list[str], labels: list[int]) -> str:
    """Hash of everything that changes the decoded arrays: root, split, size, the labels and each
    file's size+mtime."""
    # "files": these caches hold each row's file too (older ones do not, so they are not matched)
    h = hashlib.sha256(os.fsencode(f"{os.path.abspath(root)}|{split}|{image_size}|files"))   # any file name
    h.update(np.asarray(labels, dtype=np.int64).tobytes())
    for p in paths:
        h.update(os.fsencode(f"|{p[len(root):]}:{file_stamp(p)}"))
    return h.hexdigest()[:20]


def _decode(source, size: int) -> np.ndarray:
    with Image.open(source) as img:
        img.load()                              # force full decode so truncated files fail here
        x = torch.from_numpy(np.array(to_rgb(img), dtype=np.uint8))
    x = resize_center_crop(x.permute(2, 0, 1)[None].float(), size)[0]
    return x.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def _read_cache(cache_path: str, classes: list[str], log) -> ImageSet | None:
    try:
        z = torch.load(cache_path, weights_only=True)
        files = z["files"].split("\0") if z["files"] else []          # KeyError: a cache from before files
        return ImageSet(z["images"], z["labels"], list(classes), [tuple(s) for s in z["skipped"]], files)
    except Exception as e:  # noqa: BLE001 - a damaged cache is rebuilt, never fatal
        log(f"cache {cache_path} is unreadable ({type(e).__name__}); decoding the images again")
        return None


def load_imagefolder(root: str, split: str, classes: list[str], image_size: int, cache_dir: str | None,
                     workers: int, log, progress: bool = True, listing=None) -> ImageSet:
    """`listing(split, log)`: (paths, labels) other than class folders' (layout.Layout.listing)."""
    paths, labels = listing(split, log) if listing else list_split(root, split, classes, log)
    cache_path = None
    if cache_dir:
        key = _cache_key(root, split, image_size, paths, labels)
        cache_path = os.path.join(cache_dir, f"imagefolder-{split}-{image_size}-{key}.pt")
        if os.path.exists(cache_path):
            cached = _read_cache(cache_path, classes, log)
            if cached is not None:
                for path, reason in cached.skipped:
                    log(f"skipping unreadable image {path}: {reason}")
                return cached

    log(f"decoding {len(paths)} images of {split} into memory at {image_size} px (cached for later runs)")
    images, errors = _decode_all(lambda i: paths[i], len(paths), image_size, workers, f"decode {split}", progress, log)
    return _keep_readable(images, errors, labels, paths, classes, cache_path, log)


def load_pack_split(split, image_size: int, cache_dir: str | None, workers: int, log,
                    progress: bool = True) -> ImageSet:
    """A split of a pack (pack.PackSplit) decoded into memory; cached under the shards' checksums."""
    cache_path = None
    if cache_dir:
        h = hashlib.sha256(f"{split.split}|{image_size}|{len(split)}".encode())
        for shard in split.shards:
            h.update(shard["sha256"].encode())
        cache_path = os.path.join(cache_dir, f"pack-{split.split}-{image_size}-{h.hexdigest()[:20]}.pt")
        if os.path.exists(cache_path):
            cached = _read_cache(cache_path, split.classes, log)
            if cached is not None:
                return ImageSet(cached.images, cached.labels, cached.classes, list(split.skipped) + cached.skipped,
                                cached.files)
    log(f"decoding {len(split)} images of the pack's {split.split} into memory at {image_size} px "
        "(cached for later runs)")
    images, errors = _decode_all(split.source, len(split), image_size, workers, f"decode {split.split}", progress, log)
    names = [split.path(i) for i in range(len(split))]
    out = _keep_readable(images, errors, split.labels, names, split.classes, cache_path, log)
    return ImageSet(out.images, out.labels, out.classes, list(split.skipped) + out.skipped, out.files)


def _decode_all(source_of, n: int, image_size: int, workers: int, desc: str, progress: bool, log):
    """uint8 (n, S, S, 3) of sample i = `source_of(i)` (a path or bytes), and each one's error or None."""
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)

    def work(i: int) -> str | None:
        try:
            images[i] = _decode(source_of(i), image_size)
            return None
        except Exception as e:                  # any unreadable file is skipped, never fatal
            return f"{type(e).__name__}: {e}"

    bar, errors = progress_bar(n, desc, progress, log, unit="img"), []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for error in pool.map(work, range(n)):
            errors.append(error)
            bar.update()
    bar.close()
    return images, errors


def _keep_readable(images: np.ndarray, errors: list, labels, paths: list[str], classes: list[str],
                   cache_path: str | None, log) -> ImageSet:
    skipped = [(paths[i], err) for i, err in enumerate(errors) if err is not None]
    for path, reason in skipped:
        log(f"skipping unreadable image {path}: {reason}")
    keep = np.array([err is None for err in errors], dtype=bool)
    images = np.ascontiguousarray(images[keep]) if not keep.all() else images
    label_arr = np.asarray(labels, dtype=np.int64)[keep]
    kept = [p for p, ok in zip(paths, keep) if ok]
    if cache_path:
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        files.torch_save({"images": torch.from_numpy(images), "labels": torch.from_numpy(label_arr),
                          "skipped": [list(s) for s in skipped], "files": "\0".join(kept)}, cache_path)
    return ImageSet(torch.from_numpy(images), torch.from_numpy(label_arr), list(classes), skipped, kept)


def channel_stats(images: torch.Tensor, limit: int = 10000) -> tuple[tuple, tuple]:
    """Per-channel mean/std of the train images (a strided sample), for normalisation."""
    sample = images[:: max(1, len(images) // limit)].float().div_(255)
    return tuple(sample.mean((0, 1, 2)).tolist()), tuple(sample.std((0, 1, 2)).tolist())


# ---------------------------------------------------------------------- the trainer's interface

class CachedData:
    """The data interface over two in-memory sets: a step gathers this rank's rows of the global
    batch and augments them batched, on the device, with the global batch's random draws."""

    def __init__(self, train: ImageSet, test: ImageSet, cfg, env, eval_batch: int = 512):
        d, t = cfg.data, cfg.train
        self.images, self.test_images = train.images, test.images
        if env.device.type == "cuda":  # on the device when it fits: a step then never waits on the host
            from ..platform.memory import free_bytes
            if train.images.nbytes + test.images.nbytes < 0.25 * free_bytes(env.device):
                self.images, self.test_images = train.images.to(env.device), test.images.to(env.device)
        self.train, self.test = train.info(), test.info()
        self.env, self.batch_size, self.seed, self.eval_batch = env, t.batch_size, t.seed, eval_batch
        self.prefetch = d.prefetch
        mean, std = channel_stats(train.images)
        self.augment = TrainAugment(d.image_size, tuple(d.crop_scale), d.jitter, d.grayscale_p, d.flip, mean, std,
                                    compiled=d.compile_augment)
        self.test_transform = TestTransform(d.image_size, mean, std)

    def _order(self, round_: int, epoch: int) -> list[torch.Tensor]:
        return global_batches(len(self.train), self.batch_size, self.env.world, self.seed, round_, epoch)

    def steps(self, round_: int, epoch: int) -> int:
        return len(self._order(round_, epoch))

    def batches(self, round_: int, epoch: int, start: int = 0) -> Iterator[Batch]:
        return prefetch(self._build(round_, epoch, start), self.prefetch, self.env.device)

    def _build(self, round_: int, epoch: int, start: int) -> Iterator[Batch]:
        env = self.env
        order = self._order(round_, epoch)
        for step in range(start, len(order)):
            idx = order[step]
            offset, sizes = rank_slice(len(idx), env.world, env.rank)
            mine = idx[offset: offset + sizes[env.rank]]
            x = self.augment(self.images[to_device(mine, self.images.device)].to(env.device, non_blocking=True),
                             augment_generator(self.seed, round_, epoch, step), offset=offset, total=len(idx))
            yield Batch(x, to_device(idx, env.device), sizes, self.train.labels[mine])

    def eval_images(self, split: str, lo: int, hi: int) -> Iterator[torch.Tensor]:
        images = self.images if split == "train" else self.test_images
        for a in range(lo, hi, self.eval_batch):
            yield self.test_transform(images[a: min(a + self.eval_batch, hi)].to(self.env.device))

    def views(self, index: torch.Tensor, generator: torch.Generator, offset: int, count: int) -> torch.Tensor:
        mine = index[offset: offset + count]
        images = self.images[to_device(mine, self.images.device)].to(self.env.device)
        return self.augment(images, generator, offset=offset, total=len(index))

    def pictures(self, index: torch.Tensor) -> torch.Tensor:
        return self.images[index.to(self.images.device)].cpu()
