"""The checked file list of one ImageFolder split, built once and cached, for the streaming loaders.

Why: a streamed sample i must be the same file at every start (it is bank row i), ImageNet's
1.28M files take minutes to list and check, and a decoder must never meet an unreadable file
mid-epoch. So every file is opened once (in parallel, PIL at reduced JPEG scale, which still
reads every byte), the unreadable ones are left out with their reason, and the result (relative
names, labels, image sizes, formats) is cached under a key that notices a changed tree cheaply:
the root, and the mtimes of the split folder and of each class folder (adding, removing or
renaming a file changes its folder's mtime). A file rewritten in place changes neither, so a
cached list is also checked against every file's size and mtime (one stat per file, in threads)
and built again when any differs: a decoder then never meets a file the list did not check.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ...platform import files
from ...platform.log import progress_bar
from ..base import SplitInfo
from .folder import file_stamp, list_split

VERSION = 3  # bump when the cached fields or what a tree lists change (3: links into the tree)


@dataclass
class FileIndex:
    """Sample i of a split: file `path(i)`, class `labels[i]`, `sizes[i]` = (height, width) as stored
    (EXIF orientation is ignored, by PIL and DALI alike), `formats[format_id[i]]` as PIL names it."""
    split_dir: str
    names: list[str]                    # paths relative to split_dir, sorted classes then names
    labels: np.ndarray                  # int64 (N,)
    sizes: np.ndarray                   # int64 (N, 2)
    format_id: np.ndarray               # uint8 (N,)
    formats: list[str]
    stamps: np.ndarray                  # int64 (N, 2): each file's (size, mtime_ns) when checked
    classes: list[str]
    skipped: list[tuple[str, str]]      # (path, reason) of the files left out

    def __len__(self) -> int:
        return len(self.names)

    def path(self, i: int) -> str:
        return os.path.join(self.split_dir, self.names[i])

    def source(self, i: int) -> str:
        """What PIL opens for sample i (a pack gives its bytes: pack.PackSplit)."""
        return self.path(i)

    def read(self, i: int) -> bytes:
        with open(self.path(i), "rb") as f:
            return f.read()

    def format_of(self, i: int) -> str:
        return self.formats[self.format_id[i]]

    def info(self) -> SplitInfo:
        return SplitInfo(torch.from_numpy(self.labels), list(self.classes), list(self.skipped), self.path)


def tree_key(split_dir: str, classes: list[str], extra: str = "") -> str:
    """Hash of the root, the class list, the folder mtimes (cheap: one stat per class) and `extra`
    (a flat folder's label files)."""
    h = hashlib.sha256(os.fsencode(f"{VERSION}|{os.path.abspath(split_dir)}|{os.stat(split_dir).st_mtime_ns}|{extra}"))
    for cls in classes:
        cdir = os.path.join(split_dir, cls)
        h.update(os.fsencode(f"|{cls}:{os.stat(cdir).st_mtime_ns if os.path.isdir(cdir) else -1}"))
    return h.hexdigest()[:20]


CHUNK = 1024          # files per thread task: a future per file costs more than its stat


def parallel(fn, items: list, workers: int, desc: str, progress: bool = False, log=None,
             every: float = 30.0, per_chunk: bool = False) -> list:
    """[fn(x) for x in items] in threads, CHUNK items a task, in order (per_chunk: [fn(chunk) for
    each chunk], e.g. an array per chunk instead of a Python object per file). Progress: a bar on
    a terminal (`progress`), else a line to `log` every `every` seconds with the count and an ETA."""
    chunks = [items[a: a + CHUNK] for a in range(0, len(items), CHUNK)]
    task = fn if per_chunk else (lambda chunk: [fn(x) for x in chunk])
    out = []
    bar = progress_bar(len(items), desc, progress, log or (lambda _: None), every, unit="files")
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for chunk, part in zip(chunks, pool.map(task, chunks)):
            if per_chunk:
                out.append(part)
            else:
                out += part
            bar.update(len(chunk))
    bar.close()
    return out


def stamps(paths: list[str], workers: int, progress: bool = False, desc: str = "stat", log=None,
           prefix: str = "") -> np.ndarray:
    """`folder.file_stamp` of each file `prefix + path`, in threads: int64 (N, 2)."""
    def chunk_stamps(chunk: list[str]) -> np.ndarray:
        return np.asarray([file_stamp(prefix + p) for p in chunk], dtype=np.int64).reshape(-1, 2)
    parts = parallel(chunk_stamps, paths, workers, desc, progress, log, per_chunk=True)
    return np.concatenate(parts) if parts else np.empty((0, 2), dtype=np.int64)


def check_image(path: str) -> tuple[int, int, str, str | None]:
    """(height, width, format, None) if PIL can decode the whole file, else (0, 0, '', reason)."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            fmt = img.format or "unknown"
            img.draft("RGB", (max(1, width // 8), max(1, height // 8)))   # JPEG: decode at 1/8 scale
            img.load()                                                      # truncated files fail here
        if width < 1 or height < 1:
            raise ValueError("empty image")
        return height, width, fmt, None
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported and left out, never fatal
        return 0, 0, "", f"{type(e).__name__}: {e}"


def _build(root: str, split: str, classes: list[str], workers: int, progress: bool, log=None,
           listing=None) -> FileIndex:
    split_dir = os.path.join(root, split)
    paths, labels = listing(split, log) if listing else list_split(root, split, classes, log)
    checks = parallel(check_image, paths, workers, f"check {split or 'images'}", progress, log)
    keep = [i for i, c in enumerate(checks) if c[3] is None]
    formats = sorted({checks[i][2] for i in keep})
    stamped = stamps([paths[i] for i in keep], workers)
    return FileIndex(
        split_dir=split_dir,
        names=[os.path.relpath(paths[i], split_dir) for i in keep],
        labels=np.asarray([labels[i] for i in keep], dtype=np.int64),
        sizes=np.asarray([checks[i][:2] for i in keep], dtype=np.int64).reshape(-1, 2),
        format_id=np.asarray([formats.index(checks[i][2]) for i in keep], dtype=np.uint8),
        formats=formats, stamps=stamped, classes=list(classes),
        skipped=[(paths[i], c[3]) for i, c in enumerate(checks) if c[3] is not None])


def _save(index: FileIndex, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    files.torch_save({"version": VERSION, "names": "\0".join(index.names), "stamps": torch.from_numpy(index.stamps),
                      "labels": torch.from_numpy(index.labels), "sizes": torch.from_numpy(index.sizes),
                      "format_id": torch.from_numpy(index.format_id), "formats": index.formats,
                      "classes": index.classes, "skipped": [list(s) for s in index.skipped]}, path)


def _load(path: str, split_dir: str) -> FileIndex:
    z = torch.load(path, weights_only=True)
    if z["version"] != VERSION:
        raise ValueError(f"version {z['version']} != {VERSION}")
    names = z["names"].split("\0") if z["names"] else []          # NUL: the one byte no file name holds
    index = FileIndex(split_dir, names, z["labels"].numpy(), z["sizes"].numpy(), z["format_id"].numpy(),
                      list(z["formats"]), z["stamps"].numpy(), list(z["classes"]), [tuple(s) for s in z["skipped"]])
    if not (len(names) == len(index.labels) == len(index.sizes) == len(index.format_id) == len(index.stamps)):
        raise ValueError("fields of different lengths")
    return index


def load_index(root: str, split: str, classes: list[str], cache_dir: str | None, workers: int,
               log=print, progress: bool = True, verify: bool = True, listing=None, extra: str = "") -> FileIndex:
    """The split's checked file list: from the cache when the tree is unchanged, else built (and
    cached). Each unreadable file is logged once, when the list is built. `listing(split, log)`:
    (paths, labels) other than class folders' (layout.Layout.listing), `extra` what it depends on."""
    split_dir = os.path.join(root, split)
    cache_path = None
    if cache_dir:
        cache_path = os.path.join(cache_dir, f"index-{split or 'images'}-{tree_key(split_dir, classes, extra)}.pt")
        if os.path.exists(cache_path):
            try:
                index = _load(cache_path, split_dir)
                changed = 0
                if verify:
                    now = stamps(index.names, workers, progress, f"compare {split} with its cached list", log,
                                 prefix=os.path.join(split_dir, ""))             # no list of full paths
                    changed = int((now != index.stamps).any(1).sum())
                if index.classes == list(classes) and not changed:
                    return index
                why = f"{changed} files changed since" if changed else "other classes in"
                log(f"file list cache {cache_path}: {why} it; listing and checking {split_dir} again")
            except Exception as e:  # noqa: BLE001 - a damaged cache is rebuilt, never fatal
                log(f"file list cache {cache_path} is unreadable ({type(e).__name__}: {e}); "
                    f"listing and checking {split_dir} again")
    log(f"listing and checking the images of {split_dir} once ({workers} threads; the list is cached)")
    index = _build(root, split, classes, workers, progress, log, listing)
    for path, reason in index.skipped:
        log(f"skipping unreadable image {path}: {reason}")
    if cache_path:
        _save(index, cache_path)
    return index
