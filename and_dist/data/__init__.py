"""Where training images come from: `build_data` returns the trainer's data interface
(base.TrainData) for a config. Split by role: the trainer's side here (the sample order, augmentation,
prefetching, the in-memory and streaming loaders, the shared types in base.py), and what is on disk
in `sources/` (which file is sample i, the formats, the pack writer beside the pack it writes). The
loaders (and torch) are imported when data is built, so the config and the launcher can read
`sources` without them."""
from __future__ import annotations

import os
from pathlib import Path

from typing import TYPE_CHECKING

from ..platform.errors import UserError
from .sources import LOADERS, MAX_CACHED_SIZE, SOURCES, check_pack_options, check_root

if TYPE_CHECKING:
    from .base import TrainData
    from .base import ImageSet

__all__ = ["SOURCES", "LOADERS", "MAX_CACHED_SIZE", "build_data", "load_datasets", "load_streamed", "check_root",
           "check_pack_options"]


def load_datasets(source: str, root: str, image_size: int, cache_dir: str | None, download: bool = False,
                  workers: int = 2, demo_train: int = 5000, demo_test: int = 1000, demo_seed: int = 0,
                  log=print, progress: bool = True, data_config=None) -> tuple[ImageSet, ImageSet]:
    """(train, test) decoded into memory for `source` (one of SOURCES); `data_config`: the data
    section (data.classes, data.val_labels) of an imagefolder tree."""
    from .augment import resize_uint8
    from .base import ImageSet
    from .cached import load_imagefolder, load_pack_split
    from .sources.layout import resolve_layout
    from .sources.official import load_official
    if source not in SOURCES:
        raise ValueError(f"unknown dataset source {source!r}; valid: {', '.join(SOURCES)}")
    if source == "demo":
        from .sources.demo import make_demo
        return make_demo(demo_train, demo_test, demo_seed, image_size)
    if source == "pack":
        from .sources.pack import open_pack
        return tuple(load_pack_split(s, image_size, cache_dir, workers, log, progress)
                     for s in open_pack(root, cache_dir, workers, log))
    if source == "images":
        from .sources.images import empty_set, list_images
        train = load_imagefolder(root, "images", [], image_size, cache_dir, workers, log, progress,
                                 lambda _, lg: list_images(root, lg))
        sets = (train, empty_set(image_size))
    elif source == "imagefolder":
        layout = resolve_layout(root, data_config)
        sets = tuple(load_imagefolder(root, split, layout.classes, image_size, cache_dir, workers, log, progress,
                                      layout.listing) for split in ("train", layout.test))
    else:
        sets = tuple(ImageSet(resize_uint8(s.images, image_size), s.labels, s.classes, [])
                     for s in load_official(source, root, download, log))
    for split, s in zip(("train", "test"), sets):
        if len(s) == 0 and (split == "train" or s.classes):       # no classes: a set without labels
            raise UserError(f"data.root '{root}': every {split} image is unreadable "
                            f"({len(s.skipped)} skipped, e.g. {s.skipped[0][0]}: {s.skipped[0][1]})")
    return sets


def load_streamed(cfg, env, cache_dir: str | None, log=print, progress: bool = True,
                  verify: bool = True) -> TrainData:
    """The streaming data interface (data.loader dali or torch) over an ImageFolder tree (the
    checked file lists of train and test, index.py, cached) or a pack, decoded per step. `verify`: stat
    every file against the cached list (rank 0 does; the others read what it just checked)."""
    from .sources.layout import resolve_layout
    d = cfg.data
    if d.loader == "dali":
        try:
            import nvidia.dali  # noqa: F401
        except ImportError as e:
            raise UserError(f"data.loader=dali needs NVIDIA DALI (pip install nvidia-dali-cuda120): {e}") from None
        from .dali import DaliData as Loader
    else:
        from .pil_stream import TorchData as Loader
    if d.source == "pack":
        from .sources.pack import open_pack
        train, test = open_pack(d.root, cache_dir, d.workers, log, verify)
        return Loader(train, test, cfg, env)
    from .sources.index import load_index
    if d.source == "images":
        from .sources.images import empty_index, list_images, listing_key
        paths, labels = list_images(d.root, log)
        train = load_index(d.root, "", [], cache_dir, d.workers, log, progress, verify,
                           lambda _, lg: (paths, labels), listing_key(paths))
        if len(train) == 0:
            raise UserError(f"data.root '{d.root}': every image is unreadable ({len(train.skipped)} skipped, "
                            f"e.g. {train.skipped[0][0]}: {train.skipped[0][1]})")
        return Loader(train, empty_index(d.root), cfg, env)
    layout = resolve_layout(d.root, d)
    train, test = (load_index(d.root, split, layout.classes, cache_dir, d.workers, log, progress, verify,
                              layout.listing, layout.key(split)) for split in ("train", layout.test))
    for split, index in (("train", train), ("test", test)):
        if len(index) == 0:
            raise UserError(f"data.root '{d.root}': every {split} image is unreadable "
                            f"({len(index.skipped)} skipped, e.g. {index.skipped[0][0]}: {index.skipped[0][1]})")
    return Loader(train, test, cfg, env)


def _main_first(env, load):
    """`load(is_main)` on rank 0 first (it fills the caches), then on the others (they read them);
    a UserError on rank 0 stops every rank with its message instead of leaving them waiting."""
    from ..run.entry import main_decides
    result = main_decides(env, lambda: load(True), share=False)
    return result if env.is_main else load(False)


def build_data(cfg, env, cache_dir: str | None, log, progress: bool) -> TrainData:
    """The data interface for `cfg`: in-memory sets (data.loader=cached) or a streaming loader.
    cache_dir None: data.cache_dir, else <out_dir>/.cache (shared by the runs of every name)."""
    from .cached import CachedData
    cache_dir = cache_dir or cfg.data.cache_dir or str(Path(cfg.out_dir).expanduser() / ".cache")
    if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
        raise UserError(f"data.cache_dir {cache_dir} is a file; name a folder (or leave it empty)")
    quiet = lambda *_: None  # noqa: E731 - the other ranks repeat rank 0's work silently
    d = cfg.data
    if d.loader != "cached":
        return _main_first(env, lambda main: load_streamed(cfg, env, cache_dir, log if main else quiet,
                                                           progress and main, verify=main))
    kwargs = dict(source=d.source, root=d.root, image_size=d.image_size, cache_dir=cache_dir,
                  download=d.download, workers=d.workers, demo_train=d.demo_train,
                  demo_test=d.demo_test, demo_seed=d.demo_seed, data_config=d)
    sets = _main_first(env, lambda main: load_datasets(**kwargs, log=log if main else quiet,
                                                       progress=progress and main))
    return CachedData(*sets, cfg, env)
