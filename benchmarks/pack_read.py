"""Packs (and_dist/data/sources/pack.py) against the tree they were made from, in one run:

  1. images/s of each loader over one epoch (cached: decoding the split into memory; torch and
     dali: the training batches), tree and pack, printed as pack / tree ratios;
  2. files each of those opens under the data folder (openat calls counted by strace -f over the
     same epoch in a second, untimed run): one per image for the tree, a few shards for the pack;
  3. the first start of a 1,281,167-sample pack (ImageNet's train split) against the file index's
     226.3 s (benchmarks/file_index_scale.py at 1.33M files, docs/performance.md): reading and
     checking the index, and the one-time sha256 pass, measured here on a generated pack of tiny
     members and projected at the hash rate measured for a real ImageNet copy's size.

The tree is generated (ImageNet-like JPEGs, benchmarks/input_pipeline.py) unless --root is given;
its page cache is warm for both, so the ratio is the CPU cost of many files against few, not a
cluster file system's metadata round trips (which the open counts stand for).

Run:  .venv/bin/python benchmarks/pack_read.py                      # ~4 min on 2 cores
      .venv/bin/python benchmarks/pack_read.py --root /data/imagenet-256 --index-n 1281167
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO

sys.path.insert(0, str(REPO))
IMAGENET_BYTES = 147_897_477_120      # ILSVRC-2012 train as distributed (its tar), for the hash projection
INDEX_FIRST_START_S = 226.3           # the file index's first start at 1.33M files (docs/performance.md)
LOADERS = ("cached", "torch", "dali")


def _config(source: str, root: str, loader: str, args):
    from and_dist.config import load_config
    return load_config("demo", [f"data.source={source}", f"data.root={root}", f"data.loader={loader}",
                                f"data.image_size={args.size if loader != 'cached' else 64}",
                                f"data.workers={args.workers}", f"train.batch_size={args.batch}"])


def one(args) -> None:
    """--one SOURCE ROOT LOADER CACHE: images/s of one epoch, printed as JSON (run as a child)."""
    import torch
    from and_dist.data import build_data, load_datasets
    from and_dist.platform.dist import Env
    source, root, loader, cache = args.one
    cfg = _config(source, root, loader, args)
    if loader == "cached":             # training from memory reads no file: the decode is the cost
        d = cfg.data
        t0 = time.perf_counter()
        train, _ = load_datasets(source, root, 64, None, workers=d.workers, log=lambda *_: None,
                                 progress=False, data_config=d)
        print(json.dumps({"images": len(train), "seconds": time.perf_counter() - t0}))
        return
    data = build_data(cfg, Env(device=torch.device("cpu")), cache, lambda *_: None, False)
    t0, count = time.perf_counter(), 0
    for batch in data.batches(0, 0):
        count += len(batch.labels)
    print(json.dumps({"images": count, "seconds": time.perf_counter() - t0}))


def child(args, source: str, root: Path, loader: str, cache: Path, strace: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--one", source, str(root), loader, str(cache), "--size", str(args.size),
           "--batch", str(args.batch), "--workers", str(args.workers)]
    if strace:
        cmd = ["strace", "-f", "-qq", "-e", "trace=openat,open", "-o", str(strace), *cmd]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=REPO, env=env, text=True, capture_output=True)
    if out.returncode:
        sys.exit(f"{source} {loader} failed:\n{out.stdout}\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def opened(strace: Path, root: Path) -> int:
    """Opens of files under `root` that did not fail (an epoch's reads of images or shards); a call
    that another thread interrupted is logged `<unfinished ...>` with its path and counted."""
    pattern = re.compile(r'open(?:at)?\(.*"' + re.escape(str(root)) + r'/[^"]*"')
    return sum(1 for line in strace.read_text().splitlines() if pattern.search(line) and "= -1 " not in line)


def loaders(args, tree: Path, pack: Path, work: Path) -> list[str]:
    lines = [f"{'loader':8s} {'tree img/s':>11s} {'pack img/s':>11s} {'pack/tree':>10s} "
             f"{'tree opens':>11s} {'pack opens':>11s}"]
    for loader in LOADERS:
        rates, opens = {}, {}
        for source, root in (("imagefolder", tree), ("pack", pack)):
            cache = work / f"cache-{source}"
            child(args, source, root, loader, cache)                      # the file index, built once
            r = max((child(args, source, root, loader, cache) for _ in range(args.repeats)),
                    key=lambda r: r["images"] / r["seconds"])
            rates[source] = r["images"] / r["seconds"]
            trace = work / f"strace-{loader}-{source}.txt"
            child(args, source, root, loader, cache, trace)
            opens[source] = opened(trace, root)
        lines.append(f"{loader:8s} {rates['imagefolder']:11.0f} {rates['pack']:11.0f} "
                     f"{rates['pack'] / rates['imagefolder']:10.2f} {opens['imagefolder']:11d} {opens['pack']:11d}")
        print(lines[-1], flush=True)
    return lines


def first_start(args, work: Path) -> list[str]:
    """A generated pack of --index-n tiny members: open_pack's first start (hash + index) and a
    restart (index only), against the file index's 226.3 s; the hash rate projects real sizes."""
    import numpy as np
    from and_dist.data.sources.pack import open_pack, sha256_of
    from and_dist.data.sources.pack_write import ShardWriter, write_index
    from and_dist.platform import files
    root = work / "index-pack"
    n, per_shard, payload = args.index_n, -(-args.index_n // 8), b"\xff\xd8" + bytes(98)
    if not (root / "pack.json").exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        t0 = time.perf_counter()
        manifest = {"format": "and_dist pack", "version": 1, "classes": [f"c{k:04d}" for k in range(1000)],
                    "made_with": {}, "splits": {}}
        for split, count in (("train", n), ("test", 1000)):
            records, names = [], []
            for k in range(-(-count // per_shard)):
                w = ShardWriter(str(root / f"{split}-{k:05d}.tar"))
                for i in range(k * per_shard, min(count, (k + 1) * per_shard)):
                    names.append(f"{split}/c{i % 1000:04d}/{i:08d}.JPEG")
                    w.add(i, names[-1], payload, (375, 500), "JPEG", 0)
                records.append({"shard": w.close(), "rows": w.rows, "skipped": []})
            write_index(str(root), split, records, [i % 1000 for i in range(count)], names)
            manifest["splits"][split] = {"folder": split, "samples": count, "shards": [r["shard"] for r in records],
                                         "skipped": []}
        files.write_text(root / "pack.json", json.dumps(manifest))
        print(f"generated a {n}-sample pack in {time.perf_counter() - t0:.0f} s", flush=True)
    shard_bytes = sum(p.stat().st_size for p in root.glob("*.tar"))
    cache = work / "index-cache"
    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    train, _ = open_pack(str(root), str(cache), args.workers, log=lambda *_: None)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    open_pack(str(root), str(cache), args.workers, log=lambda *_: None)
    again = time.perf_counter() - t0
    t0 = time.perf_counter()
    sha256_of(str(next(root.glob("train-*.tar"))))
    per_thread = next(root.glob("train-*.tar")).stat().st_size / (time.perf_counter() - t0)
    hash_rate = per_thread * min(args.workers, 8)
    assert len(train) == n and np.all(train.length == len(payload))
    return [f"pack of {n:,} samples ({shard_bytes / 2**30:.2f} GiB of shards, 100-byte members):",
            f"  first start (sha256 of every shard + index read and checked): {first:.1f} s "
            f"= {first / INDEX_FIRST_START_S:.3f} x the file index's {INDEX_FIRST_START_S} s",
            f"  restart (checksums remembered; index read and checked): {again:.2f} s "
            f"= {again / INDEX_FIRST_START_S:.4f} x",
            f"  sha256 {per_thread / 2**20:.0f} MiB/s per thread here: a pack of ImageNet's "
            f"{IMAGENET_BYTES / 1e9:.0f} GB of originals hashes once in ~{IMAGENET_BYTES / hash_rate:.0f} s "
            f"with {min(args.workers, 8)} threads; of a --shorter-side 256 copy (~1/4) ~"
            f"{IMAGENET_BYTES / 4 / hash_rate:.0f} s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="", help="ImageFolder tree (train/, test/ or val/); default: generated")
    ap.add_argument("--images", type=int, default=2000, help="images to generate without --root")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "and_dist_pack_bench"))
    ap.add_argument("--size", type=int, default=112, help="crop side of the streaming loaders")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--index-n", type=int, default=1_281_167, help="samples of the first-start pack; 0 = skip")
    ap.add_argument("--one", nargs=4, metavar=("SOURCE", "ROOT", "LOADER", "CACHE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(args)
    from and_dist.data.sources.pack_write import write_pack
    from input_pipeline import make_folder
    work = Path(args.work)
    tree = Path(args.root).resolve() if args.root else make_folder(work / "tree", args.images)
    pack = work / "pack"
    t0, made = time.perf_counter(), "packed earlier" if (pack / "pack.json").exists() else "packed"
    write_pack(str(tree), str(pack), workers=args.workers, log=lambda *_: None, progress=False)
    made += "" if made.endswith("earlier") else f" in {time.perf_counter() - t0:.1f} s"
    lines = [f"tree {tree}: {made} into {len(list(pack.glob('*.tar')))} shards "
             f"({sum(p.stat().st_size for p in pack.glob('*.tar')) / 2**20:.0f} MiB); {args.size} px crops, "
             f"batch {args.batch}, {args.workers} workers, {os.cpu_count()} CPUs; cached: decode at 64 px"]
    print(lines[0], flush=True)
    lines += loaders(args, tree, pack, work)
    if args.index_n:
        lines += first_start(args, work)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
