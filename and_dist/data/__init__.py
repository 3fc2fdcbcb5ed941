"""Where training images come from. `SOURCES` is the registry the config's choices are read from;
`build_data` returns the trainer's data interface (base.TrainData) for a config."""
from __future__ import annotations

import os
from pathlib import Path

from ..platform.errors import UserError
from .base import Batch, SplitInfo, TrainData
from .cached import CachedData, ImageSet, load_imagefolder, load_pack_split
from .layout import resolve
from .official import REQUIRED as OFFICIAL_FILES, load_official
from .pack import is_pack

SOURCES = ("demo", "imagefolder", "pack", "cifar10", "cifar100", "svhn")
LOADERS = ("cached", "dali", "torch")   # cached: decoded in memory; dali, torch: streamed from files
MAX_CACHED_SIZE = 96  # beyond this a decoded uint8 copy of a large data set no longer fits in memory

__all__ = ["SOURCES", "LOADERS", "Batch", "SplitInfo", "TrainData", "ImageSet", "build_data", "load_datasets", "check_root",
           "check_pack_options"]


def check_root(source: str, root: str, download: bool) -> None:
    """Fail before any work if `root` cannot hold `source` (UserError, one line)."""
    if source == "demo":
        return
    if source == "pack" or is_pack(root):
        return check_pack_root(source, root)
    needed, what = OFFICIAL_FILES.get(source, (["train/"], "an ImageFolder tree"))
    can_download = source in OFFICIAL_FILES
    hint = " (or data.download=true)" if can_download else ""
    if not root:
        if can_download and download:
            raise UserError(f"data.root is empty; data.source={source} with data.download=true "
                            "needs a folder to download into")
        raise UserError(f"data.root is empty; data.source={source} needs {what} "
                        f"({' and '.join(needed)}) under it{hint}")
    if can_download and download:
        return
    if os.path.isfile(root):
        raise UserError(f"data.root '{root}' is a file; data.source={source} needs a folder holding {what}")
    if not os.path.isdir(root):
        raise UserError(f"data.root '{root}' is not an existing folder; data.source={source} needs {what} under it{hint}")
    if source == "imagefolder":
        needed = ["train/", "test/"]
    present = lambda n: os.path.exists(os.path.join(root, n)) or (n == "test/" and os.path.isdir(os.path.join(root, "val")))
    missing = [n for n in needed if not present(n)]
    if missing:
        more = ", or set data.download=true" if can_download else ""
        kind = ("folder" if missing[0].endswith("/") else "file") + ("s" if len(missing) > 1 else "")
        raise UserError(f"data.root '{root}' has no {' and '.join(missing)} {kind} "
                        f"(expected {what} for data.source={source}{more})")


def check_pack_root(source: str, root: str) -> None:
    """data.source=pack needs a finished pack at root; a pack given as another source is named."""
    if source != "pack":
        raise UserError(f"data.root '{root}' holds a pack (pack.json): set data.source=pack")
    if not root:
        raise UserError("data.root is empty; data.source=pack needs the folder that "
                        "python -m and_dist.prepare SRC DST --pack wrote")
    if not is_pack(root):
        unfinished = os.path.isdir(os.path.join(root, ".work"))
        raise UserError(f"data.root '{root}' " + ("is a pack left unfinished: run its prepare command again"
                        if unfinished else "has no pack.json; make a pack with python -m and_dist.prepare "
                        "SRC DST --pack"))


def check_pack_options(d) -> None:
    """What a pack cannot serve: its labels and classes were fixed when it was made."""
    if d.source != "pack":
        return
    fixed = [f"data.{k}" for k in ("classes", "val_labels", "val_ids") if getattr(d, k)]
    if fixed:
        raise UserError(f"{', '.join(fixed)}: a pack's classes and labels are fixed when it is made; pass them to "
                        "prepare --pack (--classes, --val-labels, --val-ids) and leave them empty here")
    if d.download:
        raise UserError("data.download=true is for data.source=cifar10/cifar100/svhn; a pack is made by prepare --pack")


def load_datasets(source: str, root: str, image_size: int, cache_dir: str | None, download: bool = False,
                  workers: int = 2, demo_train: int = 5000, demo_test: int = 1000, demo_seed: int = 0,
                  log=print, progress: bool = True, data_config=None) -> tuple[ImageSet, ImageSet]:
    """(train, test) decoded into memory for `source` (one of SOURCES); `data_config`: the data
    section (data.classes, data.val_labels) of an imagefolder tree."""
    if source not in SOURCES:
        raise ValueError(f"unknown dataset source {source!r}; valid: {', '.join(SOURCES)}")
    if source == "demo":
        from .demo import make_demo
        return make_demo(demo_train, demo_test, demo_seed, image_size)
    if source == "pack":
        from .pack import open_pack
        return tuple(load_pack_split(s, image_size, cache_dir, workers, log, progress)
                     for s in open_pack(root, cache_dir, workers, log))
    if source == "imagefolder":
        layout = resolve(root, data_config)
        sets = tuple(load_imagefolder(root, split, layout.classes, image_size, cache_dir, workers, log, progress,
                                      layout.listing) for split in ("train", layout.test))
    else:
        from .augment import resize_uint8
        sets = tuple(ImageSet(resize_uint8(s.images, image_size), s.labels, s.classes, [])
                     for s in load_official(source, root, download, log))
    for split, s in zip(("train", "test"), sets):
        if len(s) == 0:
            raise UserError(f"data.root '{root}': every {split} image is unreadable "
                            f"({len(s.skipped)} skipped, e.g. {s.skipped[0][0]}: {s.skipped[0][1]})")
    return sets


def load_streamed(cfg, env, cache_dir: str | None, log=print, progress: bool = True,
                  verify: bool = True) -> TrainData:
    """The streaming data interface (data.loader dali or torch) over an ImageFolder tree (the
    checked file lists of train and test, index.py, cached) or a pack, decoded per step. `verify`: stat
    every file against the cached list (rank 0 does; the others read what it just checked)."""
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
        from .pack import open_pack
        train, test = open_pack(d.root, cache_dir, d.workers, log, verify)
        return Loader(train, test, cfg, env)
    from .index import load_index
    layout = resolve(d.root, d)
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
