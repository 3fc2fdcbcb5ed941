"""Input pipeline: images/s of the DALI loader against the PIL DataLoader on the same JPEG folder.

Both are the trainer's own loaders (data.loader=dali and data.loader=torch) with the same config:
the same epoch plan (files, RandomResizedCrop boxes, jitter, grayscale, flip draws), image size,
batch and number of CPU workers (DALI threads / DataLoader processes). Two figures each:

  decode   the loader's own work: read, decode, crop and resize to size x size uint8
           (DALI pipeline vs DataLoader workers with PIL)
  batches  what the trainer gets: `batches()` = decode + colour jitter, grayscale, flip and
           normalisation batched on the device (--device; on the CPU with torch threads = --workers)

Each figure is the best of --repeats epochs (or their first --steps batches) over the folder's
train/ split, timed from the loader's start (paid at every epoch) to its last batch, so that a
read-ahead buffer cannot flatter it; the file list (index.py) is built before timing. Without
--root, --images JPEGs of ImageNet-like sizes (shorter side 300-450, aspect 5:4 to 3:2, smooth
content with noise, quality 90, ~100 KiB) are generated once under --cache.

--resized: instead, each loader on an original tree against its copy by and_dist.prepare
(shorter side image_size x 256/224, the evaluation resize), same config and augmentations, the
`decode` and `batches` figures, and where a PIL image's time goes (decode, crop resize; one thread).
Without --root the original tree is --images JPEGs of ImageNet's size
distribution: 97% with shorter side ~N(290, 60) px and aspect 1.1-1.5, 3% large (longer side
2,000-3,200 px), mean about 400 x 350; the mean and the largest size are printed.

Run:  .venv/bin/python benchmarks/input_pipeline.py                           # generated, 224 px, 2 workers
      .venv/bin/python benchmarks/input_pipeline.py --resized --images 400   # original vs resized copy
      .venv/bin/python benchmarks/input_pipeline.py --device cuda --workers 8 --images 4000 --batch 256
      .venv/bin/python benchmarks/input_pipeline.py --root /datasets/imagenet --workers 8 --steps 200
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from and_dist.config import load_config  # noqa: E402
from and_dist.data import build_data  # noqa: E402
from and_dist.platform.dist import Env  # noqa: E402


def _save_pattern(path: Path, rng, h: int, w: int) -> None:
    """A smooth h x w colour pattern with noise, as a JPEG."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / 64
    f = rng.uniform(0.5, 2, 6)
    img = 128 + 80 * np.stack([np.sin(f[0] * xx + f[1] * yy), np.cos(f[2] * yy - f[3] * xx),
                               np.sin(f[4] * (xx + yy)) * np.cos(f[5] * xx)], -1)
    img += rng.normal(0, 12, (h, w, 1)).astype(np.float32)
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def _write_jpeg(job: tuple[Path, int]) -> None:
    path, seed = job
    rng = np.random.default_rng(seed)
    short = int(rng.integers(300, 451))
    long = int(short * rng.uniform(1.25, 1.5))
    h, w = (short, long) if rng.random() < 0.75 else (long, short)
    _save_pattern(path, rng, h, w)


def imagenet_shape(rng) -> tuple[int, int]:
    """(height, width) drawn from ImageNet's size distribution (see --resized)."""
    if rng.random() < 0.03:
        long = int(rng.integers(2000, 3201))
        short = int(long / rng.uniform(1.25, 1.5))
    else:
        short = int(np.clip(rng.normal(290, 60), 80, 500))
        long = int(short * rng.uniform(1.1, 1.5))
    return (short, long) if rng.random() < 0.75 else (long, short)


def _write_imagenet_jpeg(job: tuple[Path, int]) -> None:
    path, seed = job
    rng = np.random.default_rng(seed)
    h, w = imagenet_shape(rng)
    _save_pattern(path, rng, h, w)


def make_folder(root: Path, count: int, classes: int = 10, write=_write_jpeg) -> Path:
    """`count` ImageNet-like JPEGs in train/ (and a few in test/); kept if already there."""
    done = root / f".complete-{count}"
    if done.exists():
        return root
    jobs = []
    for split, n in (("train", count), ("test", classes)):
        for k in range(n):
            d = root / split / f"c{k % classes:03d}"
            d.mkdir(parents=True, exist_ok=True)
            jobs.append((d / f"{k:06d}.JPEG", len(jobs)))
    with Pool() as pool:
        pool.map(write, jobs, chunksize=4)
    done.touch()
    return root


def rate(data, what: str, epoch: int, steps: int) -> float:
    """Images per second over one epoch (its first `steps` batches if > 0), from the loader's start."""
    t0, count = time.perf_counter(), 0
    it = data._decode_train(data.plans(0, epoch)) if what == "decode" else data.batches(0, epoch)
    for k, item in enumerate(it):
        count += len(item[1] if what == "decode" else item.labels)
        if k + 1 == steps:
            break
    if what == "batches" and data.env.device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - t0)


def loader_data(root: Path, loader: str, args):
    cfg = load_config("demo", ["data.source=imagefolder", f"data.root={root}", f"data.loader={loader}",
                               f"data.image_size={args.size}", f"data.workers={args.workers}",
                               f"train.batch_size={args.batch}"])
    return build_data(cfg, Env(device=torch.device(args.device)), str(Path(args.cache) / "index"), print, False)


def describe(index) -> str:
    kib = np.mean([os.path.getsize(index.path(i)) for i in range(len(index))]) / 1024
    h, w = index.sizes.mean(0)
    return f"{kib:.0f} KiB, mean {w:.0f}x{h:.0f} px, largest side {index.sizes.max()} px"


def pil_costs(data, limit: int = 400) -> tuple[float, float, float]:
    """Milliseconds per image in one thread of the PIL loader's two parts, over epoch 0's first
    crops: (decode at the reduced DCT scale, the crop's resize to size x size), and a full-size
    decode (what a decoder without DCT scaling pays, as nvJPEG does)."""
    from and_dist.data.pil_stream import decode_for_crop, resize_crop
    index, decode, resize, full, count = data.index["train"], 0.0, 0.0, 0.0, 0
    for plan in data.plans(0, 0):
        for i, box in zip(plan.mine.tolist(), plan.boxes.tolist()):
            t0 = time.perf_counter()
            img, scaled = decode_for_crop(index.path(i), box, data.size)
            t1 = time.perf_counter()
            resize_crop(img, scaled, data.size)
            t2 = time.perf_counter()
            with Image.open(index.path(i)) as whole:
                whole.convert("RGB")
            decode, resize, full = decode + t1 - t0, resize + t2 - t1, full + time.perf_counter() - t2
            count += 1
        if count >= limit:
            break
    return 1e3 * decode / count, 1e3 * resize / count, 1e3 * full / count


def compare_resized(args) -> None:
    """`decode` and `batches` images/s of each loader on the original tree and on its prepared copy."""
    from and_dist.prepare import prepare
    side = args.side or round(args.size * 256 / 224)
    src = Path(args.root) if args.root else make_folder(Path(args.cache) / "imagenet-sizes", args.images,
                                                       write=_write_imagenet_jpeg)
    dst = Path(args.cache) / f"{src.name}-{side}"
    t0 = time.perf_counter()
    counts = prepare(str(src), str(dst), side, workers=args.workers, progress=False)
    print(f"prepare --shorter-side {side}: {time.perf_counter() - t0:.1f} s ({counts})")
    results = {}
    for tree in (src, dst):
        for loader in ("dali", "torch"):
            data = loader_data(tree, loader, args)
            for what in ("decode", "batches"):
                results[tree, loader, what] = max(rate(data, what, e, args.steps) for e in range(args.repeats))
        results[tree, "costs"] = min((pil_costs(data) for _ in range(args.repeats)), key=sum)
        print(f"{tree}/train: {len(data.index['train'])} JPEGs, {describe(data.index['train'])}")
    print(f"{args.size} px crops, batch {args.batch}, {args.workers} workers, {os.cpu_count()} CPUs, device {args.device}")
    print(f"{'images/s':16s} {'original':>9s} {'resized':>9s} {'speed-up':>9s}")
    for loader in ("dali", "torch"):
        for what in ("decode", "batches"):
            a, b = results[src, loader, what], results[dst, loader, what]
            print(f"{loader + ' ' + what:16s} {a:9.1f} {b:9.1f} {b / a:8.2f}x")
    (d0, r0, f0), (d1, r1, f1) = results[src, "costs"], results[dst, "costs"]
    print(f"{'ms/image, 1 thread':20s} {'original':>9s} {'resized':>9s} {'ratio':>7s}   (PIL loader, best of {args.repeats})")
    for name, a, b in (("decode (DCT-scaled)", d0, d1), ("crop resize", r0, r1), ("both", d0 + r0, d1 + r1),
                       ("full-size decode", f0, f1)):
        print(f"{name:20s} {a:9.2f} {b:9.2f} {a / b:6.2f}x")
    print("The copy speeds up the decode only; the crop's resize to the output size costs the same on "
          "both trees, so it bounds the loader's speed-up. A decoder without DCT scaling (nvJPEG) "
          "pays the full-size decode.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="", help="ImageFolder tree (train/ and test/ or val/); default: generated")
    ap.add_argument("--images", type=int, default=800, help="images to generate without --root")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "and_dist_input_bench"))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=0, help="batches per timed epoch; 0 = all")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: DALI's mixed (nvJPEG) decoder")
    ap.add_argument("--resized", action="store_true", help="original tree against its and_dist.prepare copy")
    ap.add_argument("--side", type=int, default=0, help="--resized: shorter side of the copy; 0 = size x 256/224")
    args = ap.parse_args()
    torch.set_num_threads(args.workers)
    if args.resized:
        return compare_resized(args)
    root = Path(args.root) if args.root else make_folder(Path(args.cache) / "jpegs", args.images)
    results = {}
    for loader in ("dali", "torch"):
        data = loader_data(root, loader, args)
        results[loader] = {what: max(rate(data, what, e, args.steps) for e in range(args.repeats))
                           for what in ("decode", "batches")}
    index = data.index["train"]
    sample = range(0, len(index), max(1, len(index) // 2000))        # a stat per file is slow on NFS
    kib = np.mean([os.path.getsize(index.path(i)) for i in sample]) / 1024
    h, w = np.median(index.sizes[list(sample)], 0).astype(int)
    print(f"{len(index)} JPEGs in {root}/train ({kib:.0f} KiB, median {w}x{h} px), {args.size} px crops, "
          f"batch {args.batch}, {args.workers} workers, {os.cpu_count()} CPUs, device {args.device}")
    print(f"{'images/s':10s} {'DALI':>8s} {'PIL':>8s} {'DALI/PIL':>9s}")
    for what in ("decode", "batches"):
        d, p = results["dali"][what], results["torch"][what]
        print(f"{what:10s} {d:8.1f} {p:8.1f} {d / p:9.2f}")


if __name__ == "__main__":
    main()
