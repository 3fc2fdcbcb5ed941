"""A plain folder of unlabelled images (data.source=images): every readable image under
data.root, sub-folders included but not read as classes, in one fixed order (sorted paths:
sample i is always bank row i). There are no labels, so there is no test split: the kNN and the
probes are skipped, and everything label-free (training, discovery and its measures, the
neighbourhoods written, pictures, export) runs as on a labelled set."""
from __future__ import annotations

import hashlib
import os

from ...platform.errors import UserError
from .folder import IMAGE_EXTENSIONS, TreeWalk, is_image


def list_images(root: str, log=None) -> tuple[list[str], list[int]]:
    """Every image path under `root` (links into the tree read once, as for a class folder),
    sorted, and a label 0 for each; non-image files are counted in one warning line."""
    images, others = [], 0
    for _, paths in TreeWalk(root, log)(root):
        for path in paths:
            if is_image(os.path.basename(path)):
                images.append(path)
            else:
                others += 1
    if not images:
        raise UserError(f"data.root '{root}' holds no images (looked for {' '.join(IMAGE_EXTENSIONS)} "
                        f"in it and its sub-folders{f'; {others} other file(s) found' if others else ''})")
    if log is not None and others:
        log(f"warning: {root}: {others} file(s) left out for their extension (images are {' '.join(IMAGE_EXTENSIONS)})")
    images.sort()
    return images, [0] * len(images)


def listing_key(paths: list[str]) -> str:
    """What a cached file list of the folder depends on beyond its root's mtime: the paths found
    (a file added deep in a sub-folder changes only that sub-folder's mtime)."""
    return hashlib.sha256(os.fsencode("\0".join(paths))).hexdigest()[:20]


def empty_set(image_size: int):
    """The in-memory test split of a folder without labels: no images."""
    import torch
    from ..base import ImageSet
    return ImageSet(torch.empty(0, image_size, image_size, 3, dtype=torch.uint8), torch.empty(0, dtype=torch.long), [])


def empty_index(root: str):
    """The streamed test split of a folder without labels: no files."""
    import numpy as np
    from .index import FileIndex
    return FileIndex(root, [], np.empty(0, np.int64), np.empty((0, 2), np.int64), np.empty(0, np.uint8), [],
                     np.empty((0, 2), np.int64), [], [])


def labelled(data) -> bool:
    """Whether a data interface has labels to evaluate with (a folder of images has none)."""
    return len(data.test) > 0


NO_LABELS = ("data.source={source} has no labels, and {what} scores against labels: "
             "name a labelled data set (data.source=... data.root=...)")
