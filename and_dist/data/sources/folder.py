"""ImageFolder trees (`train/<class>/*.jpg`, `test/` or `val/` alike): the class list, the file
list in a fixed order (sample i is always the same file: it is bank row i), and the layout
mistakes users make, each as one line."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from ...platform.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
TEST_SPLITS = ("test", "val")


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB. Pillow's own convert clips 16-bit and 32-bit grey to 255 (a white picture) and
    float to 0-255; here they are scaled first: 16-bit / 257 (as DALI does), float in [0, 1] x 255."""
    if img.mode.startswith("I") or img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            a = a * 255 if a.size and a.max() <= 1 else a
        elif img.mode != "I" or (a.size and a.max() > 255):
            a = a / 257
        img = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def file_stamp(path: str) -> tuple[int, int]:
    """(size, mtime_ns) of a file, what tells a rewritten one; (-1, -1) if it is gone (a dangling link)."""
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1


def test_split(root: str) -> str:
    """The evaluation split's folder name: `test`, else `val` (ImageNet's layout)."""
    for name in TEST_SPLITS:
        if os.path.isdir(os.path.join(root, name)):
            return name
    raise UserError(f"data.root '{root}' has no test/ or val/ folder (an ImageFolder tree needs "
                    "train/<class>/ and test/<class>/ or val/<class>/)")


def class_folders(split_dir: str) -> list[str]:
    if not os.path.isdir(split_dir):
        raise UserError(f"image folder split not found: {split_dir}")
    return sorted(d for d in os.listdir(split_dir)
                  if not d.startswith(".") and os.path.isdir(os.path.join(split_dir, d)))


def _same_classes(split_dir: str, found: list[str], classes: list[str]) -> None:
    if set(found) != set(classes):
        extra, missing = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
        detail = "; ".join(s for s in (f"not in train: {', '.join(map(repr, extra[:5]))}" if extra else "",
                                       f"missing: {', '.join(map(repr, missing[:5]))}" if missing else "") if s)
        raise UserError(f"{split_dir}: its class folders differ from train's ({detail})")


def tree_classes(root: str) -> tuple[list[str], str]:
    """(train's class folders, the evaluation split's name), checked to match before any file is
    read: a mismatch found after decoding all of train would waste minutes."""
    classes, split = class_folders(os.path.join(root, "train")), test_split(root)
    if classes:
        _same_classes(os.path.join(root, split), class_folders(os.path.join(root, split)), classes)
    return classes, split


def is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _within(real: str, tree: str) -> bool:
    """Whether `real` lies in `tree` or holds it (a link to the root or to train/ itself)."""
    return real == tree or real.startswith(tree + os.sep) or tree.startswith(real + os.sep)


class TreeWalk:
    """The folders of a tree with links followed, where every real folder is met once: a link
    (folder or file) that resolves into the tree itself, or to a place already met, is left out
    with one line naming it, since its images are read where they lie (under their own class),
    never a second time under this one's. Links that lead out of the tree (a data set assembled
    from other disks) are followed. One scandir per folder: no stat per plain file."""

    def __init__(self, tree: str, log=None):
        self.tree, self.log = os.path.realpath(tree), log
        self.seen: set[str] = set()           # real folders met, and the targets of file links
        self.left_out = 0

    def _new(self, path: str, link: bool) -> bool:
        real = os.path.realpath(path)
        inside = link and _within(real, self.tree)
        if inside or real in self.seen:
            self.left_out += 1
            if self.log is not None:
                self.log(f"warning: skipping {path} -> {real}: it leads {'into the tree' if inside else 'to a place already read'}, "
                         "so its images would be read twice")
            return False
        self.seen.add(real)
        return True

    def __call__(self, start: str):
        """(folder, the paths of its non-hidden files) for every folder under `start`, in order."""
        if not self._new(start, os.path.islink(start)):
            return
        stack = [start]
        while stack:
            top = stack.pop()
            folders, names = [], []
            with os.scandir(top) as entries:
                for e in entries:
                    if e.name.startswith("."):
                        continue
                    if e.is_dir():
                        if self._new(e.path, e.is_symlink()):
                            folders.append(e.path)
                    elif not e.is_symlink() or self._new(e.path, True):
                        names.append(e.path)
            yield top, sorted(names)
            stack += sorted(folders, reverse=True)


def _files_under(cdir: str, walk: TreeWalk) -> tuple[list[str], int]:
    """Image paths under a class folder, sub-folders included (as torchvision's ImageFolder),
    sorted; and how many other non-hidden files were passed over."""
    images, others = [], 0
    for _, paths in walk(cdir):
        for path in paths:
            if is_image(os.path.basename(path)):
                images.append(path)
            else:
                others += 1
    return sorted(images), others


def list_split(root: str, split: str, classes: list[str], log=None) -> tuple[list[str], list[int]]:
    """Image paths (sorted classes, then sorted paths) and their label ids; checks the layout,
    and tells `log` of classes without images and of files passed over for their extension."""
    split_dir = os.path.join(root, split)
    found = class_folders(split_dir)
    if not found:
        loose = [n for n in os.listdir(split_dir) if is_image(n)]
        what = f"{len(loose)} images directly in it" if loose else "no class folders"
        raise UserError(f"{split_dir} has {what}: an ImageFolder split needs one sub-folder per class")
    if split != "train" and set(classes) - set(found):       # extra folders: a subset (data.classes)
        _same_classes(split_dir, sorted(set(found) & set(classes)), classes)
    paths, labels, empty, others = [], [], [], 0
    walk = TreeWalk(split_dir, log)
    for label, cls in enumerate(classes):
        images, passed = _files_under(os.path.join(split_dir, cls), walk)
        paths += images
        labels += [label] * len(images)
        others += passed
        if not images:
            empty.append(cls)
    if not paths:
        raise UserError(f"{split_dir} holds no images (extensions {' '.join(IMAGE_EXTENSIONS)})")
    if log is not None and empty:
        log(f"warning: {split_dir}: {len(empty)} class folder(s) without images: "
            f"{', '.join(map(repr, empty[:5]))}{' ...' if len(empty) > 5 else ''}")
    if log is not None and others:
        log(f"warning: {split_dir}: {others} file(s) left out for their extension "
            f"(images are {' '.join(IMAGE_EXTENSIONS)})")
    return paths, labels
