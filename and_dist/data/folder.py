"""ImageFolder trees (`train/<class>/*.jpg`, `test/` or `val/` alike): the class list, the file
list in a fixed order (sample i is always the same file: it is bank row i), and the layout
mistakes users make, each as one line."""
from __future__ import annotations

import os

from ..errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
TEST_SPLITS = ("test", "val")


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


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_split(root: str, split: str, classes: list[str]) -> tuple[list[str], list[int]]:
    """Image paths (sorted classes, then sorted names) and their label ids; checks the layout."""
    split_dir = os.path.join(root, split)
    found = class_folders(split_dir)
    if not found:
        loose = [n for n in os.listdir(split_dir) if _is_image(n)]
        what = f"{len(loose)} images directly in it" if loose else "no class folders"
        raise UserError(f"{split_dir} has {what}: an ImageFolder split needs one sub-folder per class")
    if split != "train" and set(found) != set(classes):
        extra, missing = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
        detail = "; ".join(s for s in (f"not in train: {', '.join(extra[:5])}" if extra else "",
                                       f"missing: {', '.join(missing[:5])}" if missing else "") if s)
        raise UserError(f"{split_dir}: its class folders differ from train's ({detail})")
    paths, labels = [], []
    for label, cls in enumerate(classes):
        cdir = os.path.join(split_dir, cls)
        for name in sorted(os.listdir(cdir)):
            if _is_image(name):
                paths.append(os.path.join(cdir, name))
                labels.append(label)
    if not paths:
        raise UserError(f"{split_dir} holds no images (extensions {' '.join(IMAGE_EXTENSIONS)})")
    return paths, labels
