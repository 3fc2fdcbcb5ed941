"""Datasets as in-memory uint8 tensors.

Why: AND keeps one memory-bank row per training image, so sample i must always be image i; holding
the whole (small) dataset decoded in memory makes that trivial, lets augmentation run batched on
tensors (see augment.py) and removes per-sample decoding from the training loop.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

URLS = {
    "cifar10": ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"],
    "cifar100": ["https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"],
    "svhn": ["http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
             "http://ufldl.stanford.edu/housenumbers/test_32x32.mat"],
}


@dataclass
class ImageSet:
    """A decoded split. Row i of `images` is global sample i (its memory-bank row)."""
    images: torch.Tensor                     # uint8 (N, H, W, 3), contiguous
    labels: torch.Tensor                     # int64 (N,); only for evaluation, never for training
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) left out

    def __len__(self) -> int:
        return len(self.labels)


def load_datasets(source: str, root: str, image_size: int, cache_dir: str | None, download: bool = False,
                  workers: int = 2, demo_train: int = 5000, demo_test: int = 1000, demo_seed: int = 0,
                  log=print, progress: bool = True) -> tuple[ImageSet, ImageSet]:
    """Return (train, test) for `source` in demo | imagefolder | cifar10 | cifar100 | svhn."""
    if source == "demo":
        from .demo_data import make_demo
        return make_demo(demo_train, demo_test, demo_seed, image_size)
    if source == "imagefolder":
        train_classes = _class_folders(os.path.join(root, "train"))
        return tuple(_load_imagefolder(root, split, train_classes, image_size, cache_dir, workers, log, progress)
                     for split in ("train", "test"))
    if source in ("cifar10", "cifar100", "svhn"):
        if download:
            _download(source, root, log)
        reader = {"cifar10": _read_cifar10, "cifar100": _read_cifar100, "svhn": _read_svhn}[source]
        sets = reader(root)
        return tuple(ImageSet(resize_uint8(s.images, image_size), s.labels, s.classes, []) for s in sets)
    raise ValueError(f"unknown dataset source {source!r}")


# ----------------------------------------------------------------------------------------- resizing

def _resize_pil(img: Image.Image, size: int) -> Image.Image:
    """Bilinear resize of the shorter side to `size`, then centre crop to size x size."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def resize_uint8(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Shorter-side resize + centre crop of a uint8 (N, H, W, 3) tensor; a no-op at the right size."""
    n, h, w, _ = images.shape
    if (h, w) == (size, size):
        return images.contiguous()
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = (nh - size) // 2, (nw - size) // 2
    out = torch.empty((n, size, size, 3), dtype=torch.uint8)
    for i in range(0, n, chunk):
        x = images[i:i + chunk].permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)
        x = x[:, :, top:top + size, left:left + size]
        out[i:i + chunk] = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return out


# -------------------------------------------------------------------------------------- imagefolder

def _class_folders(split_dir: str) -> list[str]:
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(f"image folder split not found: {split_dir}")
    return sorted(d for d in os.listdir(split_dir)
                  if not d.startswith(".") and os.path.isdir(os.path.join(split_dir, d)))


def _list_files(split_dir: str, classes: list[str]) -> tuple[list[str], list[int]]:
    """Image paths in deterministic order (sorted classes, sorted names) and their label ids."""
    paths, labels = [], []
    for label, cls in enumerate(classes):
        cdir = os.path.join(split_dir, cls)
        if not os.path.isdir(cdir):
            continue                           # a class may be absent from the test split
        for name in sorted(os.listdir(cdir)):
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.join(cdir, name))
                labels.append(label)
    return paths, labels


def _cache_key(root: str, split: str, image_size: int, paths: list[str]) -> str:
    """Hash of everything that changes the decoded arrays: root, split, size and each file's size+mtime."""
    h = hashlib.sha256(f"{os.path.abspath(root)}|{split}|{image_size}".encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"|{p[len(root):]}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def _decode(path: str, size: int) -> np.ndarray:
    with Image.open(path) as img:
        img.load()                              # force full decode so truncated files fail here
        return np.asarray(_resize_pil(img.convert("RGB"), size), dtype=np.uint8)


def _load_imagefolder(root: str, split: str, classes: list[str], image_size: int, cache_dir: str | None,
                      workers: int, log, progress: bool = True) -> ImageSet:
    split_dir = os.path.join(root, split)
    extra = sorted(set(_class_folders(split_dir)) - set(classes))
    if extra:
        raise ValueError(f"{split_dir} has class folders not in train: {extra}")
    paths, labels = _list_files(split_dir, classes)
    cache_path = None
    if cache_dir:
        key = _cache_key(root, split, image_size, paths)
        cache_path = os.path.join(cache_dir, f"imagefolder-{split}-{image_size}-{key}.pt")
        if os.path.exists(cache_path):
            z = torch.load(cache_path, weights_only=True)
            skipped = [tuple(s) for s in z["skipped"]]
            for path, reason in skipped:
                log(f"skipping unreadable image {path}: {reason}")
            return ImageSet(z["images"], z["labels"], list(classes), skipped)

    images = np.empty((len(paths), image_size, image_size, 3), dtype=np.uint8)

    def work(i: int) -> str | None:
        try:
            images[i] = _decode(paths[i], image_size)
            return None
        except Exception as e:                  # any unreadable file is skipped, never fatal
            return f"{type(e).__name__}: {e}"

    with ThreadPoolExecutor(max(1, workers)) as pool:
        errors = list(tqdm(pool.map(work, range(len(paths))), total=len(paths),
                           desc=f"decode {split}", unit="img", leave=False, disable=not progress))
    skipped = [(paths[i], err) for i, err in enumerate(errors) if err is not None]
    for path, reason in skipped:
        log(f"skipping unreadable image {path}: {reason}")
    keep = np.array([err is None for err in errors], dtype=bool)
    images = np.ascontiguousarray(images[keep]) if not keep.all() else images
    label_arr = np.asarray(labels, dtype=np.int64)[keep]

    if cache_path:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{cache_path}.tmp{os.getpid()}"
        torch.save({"images": torch.from_numpy(images), "labels": torch.from_numpy(label_arr),
                    "skipped": [list(s) for s in skipped]}, tmp)
        os.replace(tmp, cache_path)             # atomic: readers never see a half-written cache
    return ImageSet(torch.from_numpy(images), torch.from_numpy(label_arr), list(classes), skipped)


# ------------------------------------------------------------------------------ official formats

def _unpickle(path: str) -> dict:
    """Load an official CIFAR pickle; keys are normalised to str (the files use bytes keys)."""
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def _names(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _cifar_set(batches: list[dict], label_key: str, classes: list[str]) -> ImageSet:
    data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)        # rows are planar R, G, B
    labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
    return ImageSet(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels), classes, [])


def _read_cifar10(root: str) -> tuple[ImageSet, ImageSet]:
    d = os.path.join(root, "cifar-10-batches-py")
    classes = _names(_unpickle(os.path.join(d, "batches.meta"))["label_names"])
    train = _cifar_set([_unpickle(os.path.join(d, f"data_batch_{i}")) for i in range(1, 6)], "labels", classes)
    test = _cifar_set([_unpickle(os.path.join(d, "test_batch"))], "labels", classes)
    return train, test


def _read_cifar100(root: str) -> tuple[ImageSet, ImageSet]:
    d = os.path.join(root, "cifar-100-python")
    classes = _names(_unpickle(os.path.join(d, "meta"))["fine_label_names"])
    return tuple(_cifar_set([_unpickle(os.path.join(d, s))], "fine_labels", classes) for s in ("train", "test"))


def _read_svhn(root: str) -> tuple[ImageSet, ImageSet]:
    from scipy.io import loadmat
    sets = []
    for split in ("train", "test"):
        m = loadmat(os.path.join(root, f"{split}_32x32.mat"))
        images = np.ascontiguousarray(np.transpose(m["X"], (3, 0, 1, 2)).astype(np.uint8))   # HxWx3xN -> N,H,W,3
        labels = m["y"].reshape(-1).astype(np.int64) % 10                                  # label 10 is digit 0
        sets.append(ImageSet(torch.from_numpy(images), torch.from_numpy(labels), [str(i) for i in range(10)], []))
    return tuple(sets)


def _download(source: str, root: str, log) -> None:
    """Fetch and unpack the official files if they are not already in `root` (atomic per file)."""
    wanted = {"cifar10": ["cifar-10-batches-py/test_batch"], "cifar100": ["cifar-100-python/test"],
              "svhn": ["train_32x32.mat", "test_32x32.mat"]}[source]
    if all(os.path.exists(os.path.join(root, w)) for w in wanted):
        return
    os.makedirs(root, exist_ok=True)
    for url in URLS[source]:
        dest = os.path.join(root, os.path.basename(url))
        if not os.path.exists(dest):
            log(f"downloading {url}")
            tmp = dest + ".part"
            urllib.request.urlretrieve(url, tmp)
            os.replace(tmp, dest)
        if dest.endswith(".tar.gz"):
            with tarfile.open(dest, "r:gz") as tar:
                kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(root, **kwargs)
