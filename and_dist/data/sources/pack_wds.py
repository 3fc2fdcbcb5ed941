"""A pack from WebDataset shards: `python -m and_dist.prepare SRC DST --pack` where SRC holds tar
shards of `<key>.jpg|jpeg|png|webp` + `<key>.cls` samples (e.g. imagenet-train-000000.tar,
imagenet-val-000000.tar, or train/*.tar and val/*.tar).

Nothing is re-encoded: the shards' tar headers are read (tarfile skips over the data), every
image is decoded once to check it and take its size (as the tree writer does), and the offset
index, wids and DALI indexes, SHA256SUMS and pack.json of a pack are written beside the shards.
The shards are hard-linked into DST (no second copy of the data, and unlike a symlink the pack
survives the source being moved or deleted; the sha256 check at first use catches a shard changed
in place through the other name), or copied where DST is on another file system. Sample i of a split is
the i-th image of its shards in name order, as the shards hold them; samples without a readable
image or a `.cls` label are left out and listed in pack.json.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import tarfile
from multiprocessing import Pool

from ...platform.errors import UserError
from ...platform.log import progress_bar
from .pack import FORMAT, PACK_MANIFEST, VERSION, read_manifest, sha256_of, shard_name, wds_key
from .pack_write import finish, write_index
from .reencode import for_copy

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEST_WORDS = ("val", "validation", "test")       # the evaluation split, by any of these names


def find_shards(src: str) -> dict | None:
    """{"train": [...], "test": [...]} of the tar shards in src or in its split folders, by the
    split word in their path (imagenet-train-000000.tar, val/000.tar), and "folder": the evaluation
    split's word; None when src holds none."""
    paths = sorted(p for folder in (src, *(os.path.join(src, w) for w in ("train", *TEST_WORDS)))
                   if os.path.isdir(folder) for p in _tars(folder))
    if not paths:
        return None
    found: dict[str, list[str]] = {}
    for p in paths:
        words = set(re.split(r"[^a-z]+", os.path.relpath(p, src).lower())) & {"train", *TEST_WORDS}
        if len(words) != 1:
            raise UserError(f"{p}: its name does not say one split (train, or val/validation/test)")
        found.setdefault(words.pop(), []).append(p)
    tests = [w for w in TEST_WORDS if w in found]
    if "train" not in found or len(tests) != 1:
        raise UserError(f"{src} holds WebDataset shards of {', '.join(sorted(found))}: a pack needs train "
                        "shards and one evaluation split (val, validation or test)")
    return {"train": found["train"], "test": found[tests[0]], "folder": tests[0]}


def _tars(folder: str) -> list[str]:
    return [os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".tar")]


def scan(path: str) -> tuple[list[tuple], list[tuple[str, str]], int]:
    """One shard's samples [(image member, data offset, length, label)], the samples left out
    [(shard:key, why)], and its WebDataset sample count (runs of one key, as wids counts)."""
    samples: dict[str, dict] = {}
    runs, last = 0, None
    with tarfile.open(path, "r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            key = wds_key(m.name)
            runs, last = runs + (key != last), key
            ext = m.name[len(key) + 1:].lower()
            sample = samples.setdefault(key, {})
            if ext in IMAGE_EXTS:
                sample["image"] = (m.name, m.offset_data, m.size)
            elif ext == "cls":
                sample["cls"] = tar.extractfile(m).read()
    kept, left = [], []
    for key, s in samples.items():
        try:
            label = int(s["cls"].decode().strip())
        except (KeyError, ValueError, UnicodeDecodeError):
            left.append((f"{path}:{key}", "no integer .cls label" if "image" in s else "no image, no .cls label"))
            continue
        if "image" not in s:
            left.append((f"{path}:{key}", f"no image ({', '.join('.' + e for e in IMAGE_EXTS)})"))
            continue
        kept.append((*s["image"], label))
    return kept, left, runs


def _check(job: tuple[int, str, int, int]) -> tuple[int, tuple[int, int], str, str | None]:
    """(ordinal, (height, width), format, None) of a sample whose image decodes, else a reason."""
    ordinal, path, offset, length = job
    try:
        with open(path, "rb") as f:
            data = os.pread(f.fileno(), length, offset)
        _, fmt, hw = for_copy(io.BytesIO(data), None)
        return ordinal, hw, fmt, None
    except Exception as e:  # noqa: BLE001 - an unreadable image is reported and left out, never fatal
        return ordinal, (0, 0), "", f"{type(e).__name__}: {e}"


def _link(src: str, dst: str) -> str:
    tmp = dst + ".part"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    try:
        os.link(src, tmp)
        how = "linked"
    except OSError:                       # another file system (or links not allowed): copy
        shutil.copyfile(src, tmp)
        how = "copied"
    os.replace(tmp, dst)
    return how


def index_shards(src: str, dst: str, shards: dict, workers: int = 0, log=print, progress: bool = True) -> dict:
    """Make DST a pack of the WebDataset shards found in src (find_shards); returns counts."""
    src, dst = os.path.abspath(src), os.path.abspath(dst)
    options = {"webdataset": src, "version": VERSION}
    if os.path.isfile(os.path.join(dst, PACK_MANIFEST)):
        manifest = read_manifest(dst)
        if manifest.get("made_with") != options:
            raise UserError(f"{dst} holds a pack made with {manifest.get('made_with')}; remove it to index {src}")
        log(f"{dst} is a finished pack; nothing to do (remove it to make it again)")
        return {"indexed": 0, "skipped": 0}
    os.makedirs(dst, exist_ok=True)
    manifest = {"format": FORMAT, "version": VERSION, "classes": [], "made_with": options, "splits": {}}
    counts, how, top = {"indexed": 0, "skipped": 0}, set(), -1
    with Pool(workers or os.cpu_count()) as pool:
        for split in ("train", "test"):
            records, labels, names, skipped, entries = [], [], [], [], []
            for k, path in enumerate(shards[split]):
                kept, left, runs = scan(path)
                skipped += left
                file = shard_name(split, k)
                how.add(_link(path, os.path.join(dst, file)))
                first = len(names)
                names += [name for name, _, _, _ in kept]
                labels += [label for *_, label in kept]
                jobs = [(first + j, path, offset, length) for j, (_, offset, length, _) in enumerate(kept)]
                rows = []
                bar = progress_bar(len(jobs), f"check {os.path.basename(path)}", progress, log, unit="img")
                for ordinal, hw, fmt, reason in pool.imap(_check, jobs, chunksize=16):
                    bar.update()
                    if reason:
                        skipped.append((f"{path}:{names[ordinal]}", reason))
                    else:
                        rows.append((ordinal, jobs[ordinal - first][2], jobs[ordinal - first][3], *hw, fmt))
                bar.close()
                records.append({"rows": rows})
                entries.append({"file": file, "bytes": os.path.getsize(path), "samples": len(rows),
                                "wds_samples": runs, "source": path})
            for entry, digest in zip(entries, pool.map(sha256_of, [os.path.join(dst, e["file"]) for e in entries])):
                entry["sha256"] = digest
            for where, why in skipped:
                log(f"leaving out {where}: {why}")
            write_index(dst, split, records, labels, names)
            kept_labels = [labels[r[0]] for rec in records for r in rec["rows"]]
            top = max([top, *kept_labels])
            counts["indexed"] += len(kept_labels)
            counts["skipped"] += len(skipped)
            manifest["splits"][split] = {"folder": "train" if split == "train" else shards["folder"],
                                         "samples": len(kept_labels), "shards": entries, "skipped": skipped}
    manifest["classes"] = [str(c) for c in range(top + 1)]     # WebDataset labels carry no class names
    log(f"{dst}: the shards were {' and '.join(sorted(how))} from {src}")
    finish(dst, manifest)
    return counts
