"""Which files of an ImageFolder tree a run uses, and with which labels: train's class folders
or the subset of them that data.classes lists, and an evaluation split of class folders or a
flat folder labelled by data.val_labels (labels.py). Everything is checked before any image is
read: a mistake found after listing 1.28M files would waste minutes."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ...platform.errors import UserError
from .folder import is_image, class_folders, file_stamp, list_split, test_split
from .labels import FORMATS, read_labels

def find_file(path: str) -> str:
    """`path` as given (relative to the launch folder), else a file of that name in configs/
    (the shipped class lists); '' stays ''."""
    if not path or os.path.exists(os.path.expanduser(path)) or os.sep in path:
        return os.path.abspath(os.path.expanduser(path)) if path else ""
    from ...config import CONFIG_DIR        # the shipped files' folder (config imports this package)
    shipped = CONFIG_DIR / path
    return str(shipped) if shipped.is_file() else os.path.abspath(path)


def read_classes(path: str, train_classes: list[str]) -> list[str]:
    """The wnids of a class list (one a line, `#` comments), sorted: label i = the i-th."""
    if not os.path.isfile(path):
        raise UserError(f"data.classes: class list {path} does not exist")
    wanted, seen, known = [], {}, set(train_classes)
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            wnid = line.split("#", 1)[0].strip()
            if not wnid:
                continue
            if wnid not in known:
                raise UserError(f"data.classes {path} line {n}: {wnid!r} is not a class folder of train/")
            if wnid in seen:
                raise UserError(f"data.classes {path} line {n}: {wnid!r} listed twice (also on line {seen[wnid]})")
            seen[wnid] = n
            wanted.append(wnid)
    if not wanted:
        raise UserError(f"data.classes {path} lists no class")
    return sorted(wanted)


def check_layout_keys(d) -> None:
    """data.classes, data.val_labels and data.val_ids name existing files (an imagefolder tree's
    keys: other sources ignore them, as they ignore data.root's layout)."""
    if d.source != "imagefolder":
        return
    for key in ("classes", "val_labels", "val_ids"):
        value = getattr(d, key)
        if value and not os.path.isfile(find_file(value)):
            raise UserError(f"data.{key}: {value} is not a file")
    if d.val_ids and not d.val_labels:
        raise UserError("data.val_ids maps the devkit's ids of data.val_labels; set data.val_labels too")


class _NO_OPTIONS:
    classes = val_labels = val_ids = ""


@dataclass
class Layout:
    root: str
    train_classes: list[str]     # every class folder of train/
    classes: list[str]           # those used; label i = classes[i]
    test: str                    # the evaluation split's folder: "test" or "val"
    val_labels: str = ""         # label file of a flat evaluation folder
    val_ids: str = ""

    def key(self, split: str) -> str:
        """What a cached list of `split` depends on beyond its folders: the label files."""
        if split == "train" or not self.val_labels:
            return ""
        return "|".join(f"{p}:{file_stamp(p)}" for p in (self.val_labels, self.val_ids) if p)

    def listing(self, split: str, log=None) -> tuple[list[str], list[int]]:
        """Image paths and labels of `split`, sorted by class then path."""
        if split == "train" or not self.val_labels:
            return list_split(self.root, split, self.classes, log)
        return self._flat(os.path.join(self.root, split))

    def _flat(self, split_dir: str) -> tuple[list[str], list[int]]:
        labels, by_stem = read_labels(self.val_labels, self.train_classes, self.val_ids)
        label_of = {c: i for i, c in enumerate(self.classes)}
        names = sorted(n for n in os.listdir(split_dir) if is_image(n))
        paths, found = [], set()
        for name in names:
            key = os.path.splitext(name)[0] if by_stem else name
            if key not in labels:
                raise UserError(f"{split_dir}/{name} has no label in {self.val_labels}")
            found.add(key)
            if labels[key] in label_of:
                paths.append((label_of[labels[key]], os.path.join(split_dir, name)))
        missing = [k for k, w in labels.items() if k not in found and w in label_of]
        if missing:
            raise UserError(f"{self.val_labels} labels {len(missing)} file(s) missing from {split_dir}, "
                            f"e.g. {missing[0]}")
        if not paths:
            raise UserError(f"{split_dir}: no image of the classes trained on")
        paths.sort()
        return [p for _, p in paths], [label for label, _ in paths]


def resolve_layout(root: str, d=None) -> Layout:
    """The layout of the tree at `root` under data config `d` (data.classes, data.val_labels,
    data.val_ids; None: all classes, class folders), checked: class folders, the subset's wnids,
    a flat evaluation folder and its label file."""
    d = d or _NO_OPTIONS
    train = class_folders(os.path.join(root, "train"))
    test = test_split(root)
    classes = read_classes(find_file(d.classes), train) if d.classes and train else train
    layout = Layout(root, train, classes, test, find_file(d.val_labels), find_file(d.val_ids))
    test_dir = os.path.join(root, test)
    folders = class_folders(test_dir)
    if layout.val_labels:
        if folders:
            raise UserError(f"data.val_labels is for a flat {test}/ folder, but {test_dir} has class folders "
                            f"({folders[0]}, ...); leave data.val_labels empty")
        read_labels(layout.val_labels, train, layout.val_ids)          # its mistakes before any image is read
        return layout
    if not folders and any(is_image(n) for n in os.listdir(test_dir)):
        raise UserError(f"{test_dir} holds images without class folders: set data.val_labels=FILE, "
                        f"{FORMATS}")
    if train and folders:
        need = set(classes)
        extra = [] if d.classes else sorted(set(folders) - need)
        missing = sorted(need - set(folders))
        if extra or missing:
            detail = "; ".join(s for s in (f"not in train: {', '.join(map(repr, extra[:5]))}" if extra else "",
                                           f"missing: {', '.join(map(repr, missing[:5]))}" if missing else "") if s)
            raise UserError(f"{test_dir}: its class folders differ from train's ({detail})")
    return layout
