"""`python -m and_dist.prepare SRC DST --shorter-side N`: a copy of an ImageFolder tree with every
image resized once so that its shorter side is N pixels, re-encoded as JPEG; smaller images and
every other file (label files, meta.mat) are copied as they are, under the same names (the label
files name them). Then training decodes small files instead of ImageNet's originals, whose large
ones (over 2,000 px) dominate a loader's time.

Why the shorter side, not the longer: evaluation resizes the shorter side to image_size x 256/224
and centre-crops, and RandomResizedCrop draws boxes over the whole image; a copy whose shorter
side is at least that resize (256 for 224-px crops) keeps every aspect ratio and needs no
upsampling at evaluation, while a longer-side bound would shrink a 4:3 image's shorter side below it.

Resumable: each file is written to a hidden `.NAME.part` beside it and renamed into place
(os.replace), so a final name never holds half a file, and a stop signal removes the parts being
written (exit 128 + N); a file is done when its copy exists with the source's mtime (set on the
copy), so a rerun skips it and redoes a source changed since.
Unreadable images are left out with training's report line (`skipping unreadable image ...`).

`--pack` writes the split into a few large tar shards with an index instead (data/sources/pack.py), for
cluster file systems where opening 1.28M files is the cost: the same images (resized too with
--shorter-side), read by `data.source=pack data.root=DST`. When SRC holds WebDataset shards
(`key.jpg` + `key.cls` samples; train and val/test shards by name) they become a pack as they are:
indexed, hard-linked (copied across file systems), not re-encoded (data/sources/pack_wds.py).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from contextlib import contextmanager, suppress
from multiprocessing import Pool

from .data.sources.folder import TreeWalk, is_image
from .data.sources.layout import check_layout_keys
from .data.sources.reencode import for_copy
from .platform.errors import EXIT_USER_ERROR, UserError
from .platform.log import progress_bar
from .run.stop import exits_on_stop, finish_pool, quiet_worker

def _done(src: str, dst: str) -> bool:
    try:
        return os.stat(dst).st_mtime_ns == os.stat(src).st_mtime_ns
    except OSError:
        return False


def _tmp(dst: str) -> str:
    head, name = os.path.split(dst)
    return os.path.join(head, f".{name}.part")


def _finish(src: str, tmp: str, dst: str) -> None:
    st = os.stat(src)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, dst)


@contextmanager
def _writing(tmp: str):
    """Remove `tmp` if its write does not end (a stop signal, a full disk)."""
    try:
        yield
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def copy_file(src: str, dst: str) -> None:
    tmp = _tmp(dst)
    with _writing(tmp):
        shutil.copyfile(src, tmp)
        _finish(src, tmp, dst)


def resize_image(job: tuple[str, str, int, int]) -> tuple[str, str, str | None]:
    """(src, what was done: kept / copied / resized / skipped, reason if skipped)."""
    src, dst, side, quality = job
    if _done(src, dst):
        return src, "kept", None
    try:
        out, _, _ = for_copy(src, side)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported and left out, never fatal
        return src, "skipped", f"{type(e).__name__}: {e}"
    if out is None:
        copy_file(src, dst)
        return src, "copied", None
    tmp = _tmp(dst)
    with _writing(tmp):
        with open(tmp, "wb") as f:
            out.save(f, "JPEG", quality=quality)
        _finish(src, tmp, dst)
    return src, "resized", None


def plan_copy(src: str, dst: str, log=print) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(images, other files) as (source, destination) pairs, sorted; hidden entries, and links
    that lead back into the tree (data/sources/folder.py), left out."""
    images, others = [], []
    for top, paths in TreeWalk(src, log)(src):
        out_dir = os.path.join(dst, os.path.relpath(top, src))
        os.makedirs(out_dir, exist_ok=True)
        for path in paths:
            pair = (path, os.path.join(out_dir, os.path.basename(path)))
            (images if is_image(os.path.basename(path)) else others).append(pair)
    return sorted(images), sorted(others)


def prepare(src: str, dst: str, side: int, quality: int = 90, workers: int = 0, labels: tuple[str, ...] = (),
            log=print, progress: bool = True) -> dict:
    """Write the resized copy of `src` into `dst`; returns the counts of each outcome."""
    src, dst = os.path.abspath(src), os.path.abspath(dst)
    if not os.path.isdir(src):
        raise UserError(f"{src} is not a folder (an ImageFolder tree: train/<class>/..., val/ or test/)")
    if dst == src or dst.startswith(src + os.sep):
        raise UserError(f"the copy {dst} must lie outside {src}")
    for path in labels:
        if not os.path.isfile(path):
            raise UserError(f"--labels: {path} is not a file")
    images, others = plan_copy(src, dst, log)
    others += [(os.path.abspath(p), os.path.join(dst, os.path.basename(p))) for p in labels]
    counts = {"kept": 0, "copied": 0, "resized": 0, "skipped": 0, "other files": 0}
    for a, b in others:
        if not _done(a, b):
            copy_file(a, b)
            counts["other files"] += 1
    jobs = [(a, b, side, quality) for a, b in images]
    workers = workers or os.cpu_count()
    with Pool(workers, initializer=quiet_worker) as pool:
        results = pool.imap_unordered(resize_image, jobs, chunksize=max(1, min(16, len(jobs) // (8 * workers))))
        bar = progress_bar(len(jobs), f"resize to {side} px", progress, log, unit="img")
        for path, what, reason in results:
            bar.update()
            counts[what] += 1
            if reason:
                log(f"skipping unreadable image {path}: {reason}")
        bar.close()
        finish_pool(pool)
    return counts


def _size(text: str) -> int:
    """Bytes from `1G`, `256M`, `64K` or a plain number."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = units.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def _webdataset(args) -> dict | None:
    """The WebDataset shards SRC holds (None: SRC is a tree); refuses the tree-only options."""
    from .data.sources.pack_wds import find_shards
    shards = find_shards(args.src) if os.path.isdir(args.src) else None
    given = [f for f, v in (("--shorter-side", args.shorter_side), ("--classes", args.classes),
                            ("--val-labels", args.val_labels), ("--val-ids", args.val_ids)) if v]
    if shards is not None and given:
        raise UserError(f"{args.src} holds WebDataset shards, which are indexed as they are: "
                        f"{', '.join(given)} do not apply to them")
    return shards


@exits_on_stop("run the same command again to continue")
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m and_dist.prepare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="ImageFolder tree to copy (or, with --pack, a folder of WebDataset shards)")
    ap.add_argument("dst", help="where the copy or the pack goes (resumes one left unfinished there)")
    ap.add_argument("--shorter-side", type=int, default=0, metavar="N",
                    help="shorter side of the copies in px; at least image_size x 256/224 (256 for 224-px crops)")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality of the re-encoded images")
    ap.add_argument("--workers", type=int, default=0, help="processes; 0 = one per CPU")
    ap.add_argument("--labels", nargs="*", default=[], metavar="FILE",
                    help="tree copy: label files outside SRC (data.val_labels, meta.mat) to copy into DST")
    pack = ap.add_argument_group("packs (docs/data.md): each split in a few tar shards with an index")
    pack.add_argument("--pack", action="store_true", help="write a pack instead of a tree copy")
    pack.add_argument("--images", action="store_true", help="SRC is a folder of unlabelled images (data.source=images): "
                      "every image under it, no test split")
    pack.add_argument("--shard-size", default="1G", metavar="SIZE", help="bytes per shard, e.g. 1G, 256M")
    pack.add_argument("--classes", default="", metavar="FILE", help="pack only these classes (as data.classes)")
    pack.add_argument("--val-labels", default="", metavar="FILE", help="labels of a flat val/ (as data.val_labels)")
    pack.add_argument("--val-ids", default="", metavar="FILE", help="the devkit's meta.mat (as data.val_ids)")
    args = ap.parse_args(argv)
    try:
        shard_bytes = _size(args.shard_size)
    except ValueError:
        shard_bytes = 0
    problems = [m for bad, m in (
        (args.shorter_side < 0 or (not args.pack and args.shorter_side < 1),
         "--shorter-side N >= 1 is needed for a tree copy (a pack keeps the images as they are without it)"),
        (not 1 <= args.quality <= 100, "--quality must be 1..100"), (args.workers < 0, "--workers must be >= 0"),
        (shard_bytes < 1, f"--shard-size {args.shard_size!r} is not a size such as 1G or 256M"),
        (args.pack and args.labels, "--labels copies files into a tree copy; a pack takes --val-labels"),
        (not args.pack and (args.classes or args.val_labels or args.val_ids),
         "--classes, --val-labels and --val-ids are for --pack"),
        (args.images and not args.pack, "--images is for --pack (a tree copy keeps any folder as it is)"),
        (args.images and (args.classes or args.val_labels or args.val_ids),
         "--images packs a folder without labels: --classes, --val-labels and --val-ids do not apply")) if bad]
    if problems:
        print(f"error: {problems[0]}", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        if args.pack and (shards := _webdataset(args)) is not None:
            from .data.sources.pack_wds import index_shards
            counts = index_shards(args.src, args.dst, shards, args.workers, progress=sys.stderr.isatty())
        elif args.pack:
            from .data.sources.pack_write import write_pack
            options = argparse.Namespace(classes=args.classes, val_labels=args.val_labels, val_ids=args.val_ids,
                                         source="images" if args.images else "imagefolder")
            check_layout_keys(options)
            counts = write_pack(args.src, args.dst, args.shorter_side or None, args.quality, args.workers,
                                shard_bytes, options, progress=sys.stderr.isatty())
        else:
            counts = prepare(args.src, args.dst, args.shorter_side, args.quality, args.workers, tuple(args.labels),
                             progress=sys.stderr.isatty())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"{args.dst}: " + ", ".join(f"{n} {what}" for what, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
