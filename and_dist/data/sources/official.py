"""The official CIFAR-10/100 python pickles and SVHN .mat files, read directly (no torchvision)."""
from __future__ import annotations

import os
import pickle
import tarfile
import urllib.error
import urllib.request

import numpy as np
import torch

from ...platform.errors import UserError
from ..base import ImageSet
from . import OFFICIAL_FILES

URLS = {
    "cifar10": ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"],
    "cifar100": ["https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"],
    "svhn": ["http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
             "http://ufldl.stanford.edu/housenumbers/test_32x32.mat"],
}

def load_official(source: str, root: str, download: bool, log) -> tuple[ImageSet, ImageSet]:
    if download:
        _download(source, root, log)
    reader = {"cifar10": _read_cifar10, "cifar100": _read_cifar100, "svhn": _read_svhn}[source]
    return reader(root)


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
            try:
                urllib.request.urlretrieve(url, tmp)
            except (urllib.error.URLError, OSError) as e:
                raise UserError(f"data.download: cannot fetch {url} ({getattr(e, 'reason', e)}); "
                                f"put {OFFICIAL_FILES[source][1]} under {root} and set data.download=false") from None
            os.replace(tmp, dest)
        if dest.endswith(".tar.gz"):
            with tarfile.open(dest, "r:gz") as tar:
                kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(root, **kwargs)
