"""The file index (and_dist/data/sources/index.py) at ImageNet's scale: the first start and a cached
restart of a streamed run's data set-up over a generated tree of --files small JPEGs in
--classes class folders (train/) and --files/25 in val/ (ILSVRC-2012: 1,281,167 and 50,000).

What is measured, under --world gloo ranks (torchrun, as a run starts): seconds of build_data
(data.loader=torch: list, check and stat every file on the first start; read the cached list and
stat every file against it on a restart; rank 0 first, the others read its cache), the peak RSS
of rank 0 and of the other ranks beyond what they held after the imports, and the size of the
cached lists. Each start is a fresh torchrun job, so nothing is warm in-process; the files' inodes
are in the kernel's cache after generation (as on any restart of a node that trained).

Generating 1.28M files takes minutes and ~5 GB of disk (one block each); --files 100000 and a
linear extrapolation (every step is per file) is the quick figure.

Run:  .venv/bin/python benchmarks/file_index_scale.py --files 100000
      .venv/bin/python benchmarks/file_index_scale.py --files 1281167 --root /scratch/index_bench
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

from common import REPO, MiB, peak_rss, torchrun

sys.path.insert(0, str(REPO))


def _tiny_jpegs(count: int = 16) -> list[bytes]:
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(buf, "JPEG", quality=75)
        out.append(buf.getvalue())
    return out


def _write_class(job: tuple[str, str, int, list[bytes]]) -> None:
    folder, wnid, count, blobs = job
    os.makedirs(folder, exist_ok=True)
    for k in range(count):
        with open(os.path.join(folder, f"{wnid}_{k}.JPEG"), "wb") as f:
            f.write(blobs[k % len(blobs)])


def make_tree(root: Path, files: int, classes: int) -> Path:
    done = root / f".complete-{files}-{classes}"
    if done.exists():
        return root
    if root.exists():
        shutil.rmtree(root)
    blobs, jobs = _tiny_jpegs(), []
    for split, total in (("train", files), ("val", max(classes, files // 25))):
        for c in range(classes):
            wnid = f"n{c:08d}"
            jobs.append((str(root / split / wnid), wnid, total // classes + (c < total % classes), blobs))
    t0 = time.perf_counter()
    with Pool() as pool:
        pool.map(_write_class, jobs, chunksize=4)
    print(f"generated {files} + {max(classes, files // 25)} files in {time.perf_counter() - t0:.0f} s under {root}")
    done.touch()
    return root


def worker(args) -> None:
    import torch
    from and_dist.platform import dist
    from and_dist.config import load_config
    from and_dist.data import build_data
    env = dist.init("cpu")
    torch.set_num_threads(1)
    cfg = load_config("demo", ["data.source=imagefolder", f"data.root={args.root}", "data.loader=torch",
                               f"data.workers={args.threads}", "data.image_size=64", "log.progress=false"])
    before = peak_rss()
    t0 = time.perf_counter()
    data = build_data(cfg, env, args.cache, print if env.is_main else (lambda *_: None), False)
    seconds = time.perf_counter() - t0
    record = {"rank": env.rank, "seconds": seconds, "peak_mib": (peak_rss() - before) / MiB,
              "train": len(data.train), "test": len(data.test)}
    rows = [record]
    if env.world > 1:
        rows = [None] * env.world
        torch.distributed.all_gather_object(rows, record)
    if env.is_main:
        Path(args.out).write_text(json.dumps(rows))
    dist.shutdown()


def measure(args, files: int) -> dict:
    """{start: [per-rank record]} of a first start and a cached restart over `files` files."""
    base = Path(args.root)
    tree = make_tree(base / f"tree-{files}", files, args.classes)
    cache = base / f"cache-{files}"
    shutil.rmtree(cache, ignore_errors=True)
    rows = {}
    for start in ("first start", "cached restart"):
        out = base / "result.json"
        torchrun(__file__, args.world, ["--root", str(tree), "--cache", str(cache), "--out", str(out),
                                        "--threads", str(args.threads)], 1, start)
        rows[start] = json.loads(out.read_text())
    rows["MiB"] = sum(p.stat().st_size for p in cache.glob("index-*.pt")) / MiB
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, nargs="+", default=[20000, 100000],
                    help="train files per tree; with two or more sizes the last two extrapolate to ImageNet's")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "and_dist_index_bench"))
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="data.workers: checking / stat threads")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cache", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    results = {files: measure(args, files) for files in args.files}
    print(f"{args.classes} classes, {args.world} ranks, {args.threads} threads, {os.cpu_count()} CPUs "
          f"(train files + val files = files/25)")
    print(f"{'files':>9s} {'start':16s} {'seconds':>8s} {'rank 0 MiB':>11s} {'others MiB':>11s} {'cache MiB':>10s}")
    table = {}
    for files, rows in results.items():
        for start in ("first start", "cached restart"):
            ranks = rows[start]
            n = ranks[0]["train"] + ranks[0]["test"]
            s, zero = max(r["seconds"] for r in ranks), ranks[0]["peak_mib"]
            others = max((r["peak_mib"] for r in ranks if r["rank"]), default=0.0)
            table[files, start] = (n, s, zero, others, rows["MiB"])
            print(f"{n:9d} {start:16s} {s:8.1f} {zero:11.0f} {others:11.0f} {rows['MiB']:10.1f}")
    if len(args.files) >= 2:                        # linear in the files: a + b n through the last two sizes
        full = 1281167 + 50000
        for start in ("first start", "cached restart"):
            lo, hi = table[args.files[-2], start], table[args.files[-1], start]
            at = lambda k: lo[k] + (hi[k] - lo[k]) * (full - lo[0]) / (hi[0] - lo[0])  # noqa: E731
            print(f"{full:9d} {start:16s} {at(1):8.1f} {at(2):11.0f} {at(3):11.0f} {at(4):10.1f}  (extrapolated)")


if __name__ == "__main__":
    main()
