"""What is on disk: the data sources a config can name, one module per format (ImageFolder trees,
plain image folders, packs and their writer, the official CIFAR/SVHN files, the embedded demo),
each saying which file or record is sample i. This file holds the names and the checks of a
source's root that run before any work (config validation, the launcher): light, so they need
neither torch nor an image library."""
from __future__ import annotations

import os

from ...platform.errors import UserError

SOURCES = ("demo", "imagefolder", "images", "pack", "cifar10", "cifar100", "svhn")
LOADERS = ("cached", "dali", "torch")   # cached: decoded in memory; dali, torch: streamed from files
MAX_CACHED_SIZE = 96  # beyond this a decoded uint8 copy of a large data set no longer fits in memory
PACK_MANIFEST = "pack.json"             # what makes a folder a finished pack
OFFICIAL_FILES = {                      # what an official download leaves under data.root
    "cifar10": (["cifar-10-batches-py/"], "the official CIFAR-10 python download"),
    "cifar100": (["cifar-100-python/"], "the official CIFAR-100 python download"),
    "svhn": (["train_32x32.mat", "test_32x32.mat"], "the official SVHN .mat files"),
}


def is_pack(root: str) -> bool:
    return bool(root) and os.path.isfile(os.path.join(root, PACK_MANIFEST))


def check_root(source: str, root: str, download: bool) -> None:
    """Fail before any work if `root` cannot hold `source` (UserError, one line)."""
    if source == "demo":
        return
    if source == "pack" or is_pack(root):
        return check_pack_root(source, root)
    if source == "images":           # any folder: what it holds is listed when data is built
        if not root or not os.path.isdir(root):
            what = "is empty" if not root else ("is a file" if os.path.isfile(root) else "is not an existing folder")
            raise UserError(f"data.root {root!r} {what}; data.source=images needs a folder of images")
        return
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
