"""What the device session reads, made or unpacked where it runs.

Nothing can be downloaded there and only 64 MiB travels, so parts b and c write their ImageNet-layout
JPEG trees on the spot, and part e's CIFAR-10 comes as one archive of its pack (the carry), checked
before any part runs."""
from __future__ import annotations

import os
import shutil
import tarfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from common import REPO

if TYPE_CHECKING:
    from gpu_session import Session


def _image(args) -> None:
    """One JPEG of a class: a smooth random picture tinted by its class (so kNN beats chance)."""
    from PIL import Image
    import numpy as np
    path, cls, seed, (h, w) = args
    rng = np.random.RandomState(seed)
    small = rng.randint(0, 256, (6, 8, 3)).astype(np.float32)
    small = 0.5 * small + 0.5 * np.array([(cls * 71) % 256, (cls * 151) % 256, (cls * 37) % 256], np.float32)
    Image.fromarray(small.astype(np.uint8)).resize((w, h), Image.BICUBIC).save(path, quality=90)


def jpeg_tree(root: Path, classes: int, train: int, test: int, sizes) -> Path:
    """An ImageFolder tree train/ + val/ of `classes` folders of full-size JPEGs, made in parallel."""
    if (root / "done").exists():
        return root
    jobs = []
    for split, count in (("train", train), ("val", test)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                seed = 1_000_003 * (split == "val") + 1009 * c + i
                jobs.append((str(folder / f"{c}_{i}.JPEG"), c, seed, sizes[seed % len(sizes)]))
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        list(pool.map(_image, jobs))
    (root / "done").write_text("")
    return root


def imagenet_tree(s: Session) -> Path:
    """Parts b and c's ImageNet-layout tree (AlexNet-BN on the torch loader), at the session's size."""
    if s.args.quick:
        return jpeg_tree(Path(s.args.work) / "tree", 2, 16, 6, [(120, 160), (160, 120)])
    return jpeg_tree(Path(s.args.work) / "tree", 10, 160, 20, [(375, 500), (500, 375), (333, 500), (500, 333)])


ARCHIVES = (".tar.gz", ".tgz", ".tar.xz", ".tar")
CARRY = REPO / "data" / "cifar10-pack.tar.gz"      # what docs/performance.md's carry commands make


def unpacked(archive: Path, into: Path) -> Path:
    """The pack folder inside a carried archive, extracted under `into` once (the carry travels as
    one compressed file: CIFAR-10's 60,000 JPEGs share their headers, so gzip halves them)."""
    done = into / (archive.name + ".done")
    if not done.exists():
        shutil.rmtree(into / "extract", ignore_errors=True)
        with tarfile.open(archive) as tar:
            tar.extractall(into / "extract", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        done.write_text("")
    found = sorted(p.parent for p in (into / "extract").rglob("pack.json"))
    return found[0] if found else into / "extract"


def tiny_carry(work: Path) -> Path:
    """--quick without --cifar: a generated tree packed and archived as the real carry is."""
    from and_dist.data.sources.pack_write import write_pack
    archive = work / "tiny-pack.tar.gz"
    if not archive.exists():
        tree = jpeg_tree(work / "tiny", 10, 4, 2, [(32, 32)])
        write_pack(str(tree), str(work / "tiny-pack"), workers=1, log=lambda *_: None, progress=False)
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(work / "tiny-pack", "tiny-pack")
    return archive


def fidelity_data(s: Session) -> tuple[list[str], str, int, int] | str:
    """Part e's data overrides, its name and (train, test) sizes, or the line saying there is none."""
    work = Path(s.args.work)
    from and_dist.data.sources.pack import open_pack
    from and_dist.platform.errors import UserError
    carry = tiny_carry(work) if s.args.cifar is None and s.args.quick else \
        Path(s.args.cifar).resolve() if s.args.cifar else CARRY if CARRY.exists() else REPO / "data" / "cifar10-pack"
    name = "a tiny generated pack" if s.args.cifar is None and s.args.quick else "CIFAR-10"
    try:
        root = unpacked(carry, work / "carry") if carry.name.endswith(ARCHIVES) and carry.is_file() else carry
        if (root / "pack.json").exists():       # every shard's size and sha256, and the index
            train, test = open_pack(str(root), str(work / "cache"), 2, log=lambda *_: None)
            return ["data.source=pack", f"data.root={root}"], name, len(train), len(test)
    except (tarfile.TarError, OSError, EOFError, zlib.error, UserError) as e:
        return f"damaged carry {carry}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if (root / "train").is_dir():
        return ["data.source=imagefolder", f"data.root={root}"], name, 50_000, 10_000
    return f"no CIFAR-10 at {carry} (docs/performance.md says how to make the carry)"
