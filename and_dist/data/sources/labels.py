"""Label files of a flat validation folder: ILSVRC-2012's val/ as most copies hold it, 50,000
files in one folder, their classes in a separate file.

Three formats, told apart by their content (their names vary between copies):
  devkit  ILSVRC2012_validation_ground_truth.txt: line k holds the 1-based ILSVRC id of
          ILSVRC2012_val_<k, 8 digits>.JPEG; ids become wnids through the devkit's meta.mat (read
          from the label file's folder, or data.val_ids: meta.mat or `id wnid` lines)
  kaggle  LOC_val_solution.csv: header `ImageId,PredictionString`; ImageId is the file name
          without extension, the string's first token its wnid
  plain   val.txt: `filename label` lines (VISSL, mmpretrain), label a wnid or the class index
          in train's sorted class folders
Every label must name a class folder of train/; each mistake is one line naming the file and line.
"""
from __future__ import annotations

import os
import re

from ...platform.errors import UserError

FORMATS = ("the devkit's ILSVRC2012_validation_ground_truth.txt (with its meta.mat), Kaggle's "
           "LOC_val_solution.csv, or a val.txt of `filename label` lines")


def _lines(path: str) -> list[tuple[int, str]]:
    """(line number, stripped text) of the non-blank lines."""
    if not os.path.isfile(path):
        raise UserError(f"label file {path} does not exist")
    try:
        with open(path, encoding="utf-8-sig") as f:
            return [(n, s) for n, line in enumerate(f, 1) if (s := line.strip())]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"label file {path} cannot be read as text ({type(e).__name__}: {e})") from None


def read_ids(path: str) -> dict[int, str]:
    """ILSVRC id -> wnid, from the devkit's meta.mat or a text file of `id wnid` lines."""
    if not os.path.isfile(path):
        raise UserError(f"id-to-wnid file {path} does not exist (the devkit's meta.mat, or `id wnid` "
                        "lines; set data.val_ids)")
    with open(path, "rb") as f:
        is_mat = f.read(6) == b"MATLAB"
    if is_mat:
        from scipy.io import loadmat
        try:
            synsets = loadmat(path, squeeze_me=True)["synsets"]
            return {int(i): str(w) for i, w in zip(synsets["ILSVRC2012_ID"].ravel(), synsets["WNID"].ravel())}
        except (KeyError, ValueError, TypeError) as e:
            raise UserError(f"{path}: not the devkit's meta.mat (no synsets with ILSVRC2012_ID and WNID: {e})") from None
    ids = {}
    for n, text in _lines(path):
        parts = text.split()
        if len(parts) < 2 or not parts[0].isdigit():
            raise UserError(f"{path} line {n}: expected `id wnid`, got {text[:60]!r}")
        ids[int(parts[0])] = parts[1]
    return ids


def kind_of(lines: list[tuple[int, str]]) -> str:
    """'devkit', 'kaggle' or 'plain' from the first line, '' if none fits."""
    if not lines:
        return ""
    first = lines[0][1]
    if first.lower().startswith("imageid,"):
        return "kaggle"
    parts = first.split()
    if len(parts) == 1 and parts[0].isdigit():
        return "devkit"
    return "plain" if len(parts) == 2 else ""


def read_labels(path: str, train_classes: list[str], ids_path: str = "") -> tuple[dict[str, str], bool]:
    """({file name -> wnid}, by_stem): by_stem when the names carry no extension (Kaggle)."""
    lines = _lines(path)
    kind = kind_of(lines)
    if not kind:
        raise UserError(f"label file {path}: not a format I know (expected {FORMATS})")
    known = set(train_classes)
    labels: dict[str, str] = {}
    first_line: dict[str, int] = {}

    def add(n: int, name: str, wnid: str) -> None:
        if wnid not in known:
            raise UserError(f"{path} line {n}: {wnid!r} is not a class folder of train/")
        if name in labels:
            raise UserError(f"{path} line {n}: {name} is labelled twice (also on line {first_line[name]})")
        labels[name], first_line[name] = wnid, n

    if kind == "devkit":
        ids = read_ids(ids_path or os.path.join(os.path.dirname(os.path.abspath(path)), "meta.mat"))
        for k, (n, text) in enumerate(lines, 1):
            if not text.isdigit() or int(text) not in ids:
                raise UserError(f"{path} line {n}: {text[:60]!r} is not an ILSVRC id of {ids_path or 'meta.mat'}")
            add(n, f"ILSVRC2012_val_{k:08d}.JPEG", ids[int(text)])
    elif kind == "kaggle":
        for n, text in lines[1:]:
            image, _, prediction = text.partition(",")
            if not image or not prediction.split():
                raise UserError(f"{path} line {n}: expected `ImageId,wnid ...`, got {text[:60]!r}")
            add(n, image.strip(), prediction.split()[0])
    else:
        for n, text in lines:
            parts = text.rsplit(None, 1)
            if len(parts) != 2:
                raise UserError(f"{path} line {n}: expected `filename label`, got {text[:60]!r}")
            name, label = parts
            if re.fullmatch(r"\d+", label):
                if int(label) >= len(train_classes):
                    raise UserError(f"{path} line {n}: class index {label} but train/ has "
                                    f"{len(train_classes)} class folders")
                label = train_classes[int(label)]
            add(n, os.path.basename(name), label)
    return labels, kind == "kaggle"
