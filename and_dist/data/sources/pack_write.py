"""Writing a pack (pack.py) from an ImageFolder tree: `python -m and_dist.prepare SRC DST --pack`.

Images are encoded in worker processes (kept as they are, or resized with --shorter-side: the
bytes a tree copy would hold, reencode.py) and appended in listing order to the current shard,
so sample i of the pack is sample i of the tree. Each image is followed by its label as a
`<key>.cls` member (WebDataset's convention), so webdataset, wids and DALI read the shards as
they are. A shard is written as a hidden `.NAME.part`,
renamed when full, and then its record (the samples it holds, the images left out) is written
under DST/.work; a rerun keeps every shard with a record and continues after the last one. The
index, the wids shard index, SHA256SUMS and pack.json (last: its presence means the pack is
whole) are written from the records, and .work is removed.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import tarfile
from contextlib import suppress
from multiprocessing import Pool

import numpy as np
from ...platform import files
from ...platform.errors import UserError
from ...platform.log import progress_bar
from ...run.stop import SIGNALS, finish_pool
from .layout import resolve_layout
from .pack import FORMAT, PACK_MANIFEST, PACK_SPLITS, VERSION, index_name, read_manifest, shard_name, wds_key, wids_name
from .reencode import for_copy, reencoded

WORK = ".work"
BLOCK = tarfile.BLOCKSIZE


def _encoder_start() -> None:
    """Encoders write nothing: a stop ends them at once (the parent removes the shard being
    written and stops the pool), and Ctrl-C reaches only the parent's handler."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN if s == signal.SIGINT else signal.SIG_DFL)


def encode(job: tuple[int, str, int | None, int]) -> tuple[int, bytes | None, tuple[int, int], str, str | None]:
    """(ordinal, stored bytes, (height, width), format, None), or (ordinal, None, ..., reason)."""
    ordinal, src, side, quality = job
    try:
        out, fmt, hw = for_copy(src, side)
        if out is None:
            with open(src, "rb") as f:
                return ordinal, f.read(), hw, fmt, None
        data, fmt = reencoded(out, side, quality)
        return ordinal, data, hw, fmt, None
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported and left out, never fatal
        return ordinal, None, (0, 0), "", f"{type(e).__name__}: {e}"


class ShardWriter:
    """One tar shard being written: members appended with their header, hashed on the way."""

    def __init__(self, path: str):
        self.path, self.tmp = path, os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.part")
        self.f = open(self.tmp, "wb")
        self.hash, self.size = hashlib.sha256(), 0
        self.rows: list[tuple] = []        # (ordinal, offset, length, h, w, format)
        self.skipped: list[tuple[int, str]] = []

    def _put(self, data: bytes) -> None:
        self.f.write(data)
        self.hash.update(data)
        self.size += len(data)

    def _member(self, name: str, data: bytes, mtime: float) -> int:
        """Append one member; the offset of its data."""
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), int(mtime), 0o644
        self._put(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        offset = self.size
        self._put(data + b"\0" * (-len(data) % BLOCK))
        return offset

    def add(self, ordinal: int, name: str, data: bytes, hw: tuple[int, int], fmt: str, mtime: float,
            label: int) -> None:
        """The image, then its label as `<key>.cls` (what WebDataset readers take as the class)."""
        self.rows.append((ordinal, self._member(name, data, mtime), len(data), *hw, fmt))
        self._member(f"{wds_key(name)}.cls", str(label).encode(), mtime)

    def close(self) -> dict:
        """End the archive (two zero blocks, padded to tar's record size), make it durable, rename it."""
        end = 2 * BLOCK
        self._put(b"\0" * (end + (-(self.size + end) % tarfile.RECORDSIZE)))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
        files.fsync_dir(os.path.dirname(self.path))
        return {"file": os.path.basename(self.path), "bytes": self.size, "sha256": self.hash.hexdigest(),
                "samples": len(self.rows)}

    def discard(self) -> None:
        with suppress(OSError):
            self.f.close()
        with suppress(OSError):
            os.unlink(self.tmp)


def _record_path(dst: str, split: str, k: int) -> str:
    return os.path.join(dst, WORK, f"{split}-{k:05d}.json")


def _ends(names: list[str], lo: int, hi: int) -> list[str]:
    """The first and last source names of a shard's range: what tells that a listing changed."""
    return names[lo:hi][:1] + names[lo:hi][-1:]


def _save_record(dst: str, split: str, k: int, shard: dict, w: ShardWriter, lo: int, hi: int,
                 names: list[str]) -> dict:
    record = {"shard": shard, "range": [lo, hi], "names": _ends(names, lo, hi), "rows": w.rows,
              "skipped": w.skipped}
    files.write_text(_record_path(dst, split, k), json.dumps(record))
    return record


def _done_records(dst: str, split: str, names: list[str]) -> list[dict]:
    """The records of the shards a previous run finished, checked against today's listing."""
    records = []
    while os.path.exists(path := _record_path(dst, split, len(records))):
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        shard = os.path.join(dst, record["shard"]["file"])
        if not os.path.isfile(shard) or os.path.getsize(shard) != record["shard"]["bytes"]:
            break                                           # written again from here
        lo, hi = record["range"]
        if hi > len(names) or record["names"] != _ends(names, lo, hi):
            raise UserError(f"{dst} was started from another listing of the source (files added or removed "
                            "since); remove it to start again")
        records.append(record)
    return records


def _write_split(src: str, dst: str, split: str, folder: str, paths: list[str], labels: list[int],
                 side: int | None, quality: int, shard_bytes: int, pool, counts: dict, log,
                 progress: bool) -> list[dict]:
    names = [os.path.relpath(p, src) for p in paths]
    records = _done_records(dst, split, names)
    start = records[-1]["range"][1] if records else 0
    counts["kept"] += start
    jobs = [(i, paths[i], side, quality) for i in range(start, len(paths))]
    writer, lo = None, start
    try:
        results = pool.imap(encode, jobs, chunksize=max(1, min(16, len(jobs) // 64)))
        bar = progress_bar(len(jobs), f"pack {folder}", progress, log, unit="img")
        for ordinal, data, hw, fmt, reason in results:
            bar.update()
            writer = writer or ShardWriter(os.path.join(dst, shard_name(split, len(records))))
            if data is None:
                log(f"skipping unreadable image {paths[ordinal]}: {reason}")
                writer.skipped.append((ordinal, reason))
                counts["skipped"] += 1
                continue
            writer.add(ordinal, names[ordinal], data, hw, fmt, os.path.getmtime(paths[ordinal]), labels[ordinal])
            counts["packed"] += 1
            if writer.size >= shard_bytes:
                records.append(_save_record(dst, split, len(records), writer.close(), writer, lo, ordinal + 1,
                                              names))
                writer, lo = None, ordinal + 1
        if writer is not None or not records:
            writer = writer or ShardWriter(os.path.join(dst, shard_name(split, len(records))))
            records.append(_save_record(dst, split, len(records), writer.close(), writer, lo, len(paths), names))
            writer = None
        bar.close()
    finally:
        if writer is not None:
            writer.discard()
    return records


def write_index(dst: str, split: str, records: list[dict], labels: list[int], names: list[str]) -> None:
    rows = [(k, *row) for k, r in enumerate(records) for row in r["rows"]]
    if not rows and names:                # (a folder without labels has an empty test split)
        raise UserError(f"every {split} image of the source is unreadable; nothing to pack")
    ordinal = np.asarray([r[1] for r in rows], dtype=np.int64)
    formats = sorted({r[6] for r in rows})
    arrays = {"shard": np.asarray([r[0] for r in rows], dtype=np.int32),
              "offset": np.asarray([r[2] for r in rows], dtype=np.int64),
              "length": np.asarray([r[3] for r in rows], dtype=np.int64),
              "label": np.asarray(labels, dtype=np.int64)[ordinal],
              "sizes": np.asarray([r[4:6] for r in rows], dtype=np.int64).reshape(-1, 2),
              "format_id": np.asarray([formats.index(r[6]) for r in rows], dtype=np.uint8),
              "formats": np.asarray(formats),
              "names": np.frombuffer("\0".join(names[i] for i in ordinal).encode("utf-8", "surrogateescape"),
                                     dtype=np.uint8)}
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    files.write_bytes(os.path.join(dst, index_name(split)), buf.getvalue())


def write_pack(src: str, dst: str, side: int | None = None, quality: int = 90, workers: int = 0,
               shard_bytes: int = 1 << 30, data_options=None, log=print, progress: bool = True) -> dict:
    """Pack the tree at `src` into `dst` (resuming a pack left unfinished there); returns counts.
    `data_options`: data.classes / data.val_labels / data.val_ids for the tree's layout."""
    src, dst = os.path.abspath(src), os.path.abspath(dst)
    if not os.path.isdir(src):
        raise UserError(f"{src} is not a folder (an ImageFolder tree: train/<class>/..., val/ or test/)")
    if dst == src or dst.startswith(src + os.sep):
        raise UserError(f"the pack {dst} must lie outside {src}")
    options = {"shorter_side": side, "quality": quality if side else None, "shard_bytes": shard_bytes,
               "source": src, "version": VERSION}
    images = getattr(data_options, "source", "") == "images"
    if images:
        options["images"] = True          # (absent otherwise: packs made before keep their manifest)
    if os.path.isfile(os.path.join(dst, PACK_MANIFEST)):
        made = read_manifest(dst).get("made_with", {})
        if made != options:
            raise UserError(f"{dst} holds a finished pack made with {made}; remove it to make one with {options}")
        log(f"{dst} is a finished pack; nothing to do (remove it to make it again)")
        return {"kept": sum(s["samples"] for s in read_manifest(dst)["splits"].values()), "packed": 0, "skipped": 0}
    os.makedirs(os.path.join(dst, WORK), exist_ok=True)
    started = os.path.join(dst, WORK, "options.json")
    if os.path.exists(started):
        with open(started, encoding="utf-8") as f:
            before = json.load(f)
        if before != options:
            raise UserError(f"{dst} was started with {before}; rerun with those options or remove it "
                            f"to start with {options}")
    else:
        files.write_text(started, json.dumps(options))
    if images:                            # no labels: every image is train, no test
        from .images import list_images
        listings, folders, classes = {"train": list_images(src, log), "test": ([], [])}, {"train": ".", "test": "."}, []
    else:
        layout = resolve_layout(src, data_options)
        listings = {"train": layout.listing("train", log), "test": layout.listing(layout.test, log)}
        folders, classes = {"train": "train", "test": layout.test}, layout.classes
    counts = {"kept": 0, "packed": 0, "skipped": 0}
    manifest = {"format": FORMAT, "version": VERSION, "classes": classes, "made_with": options, "splits": {}}
    with Pool(workers or os.cpu_count(), initializer=_encoder_start) as pool:
        for split in PACK_SPLITS:
            paths, labels = listings[split]
            records = _write_split(src, dst, split, folders[split], paths, labels, side, quality, shard_bytes,
                                   pool, counts, log, progress)
            write_index(dst, split, records, labels, [os.path.relpath(p, src) for p in paths])
            manifest["splits"][split] = {
                "folder": folders[split], "samples": sum(r["shard"]["samples"] for r in records),
                "shards": [r["shard"] for r in records],
                "skipped": [(paths[i], why) for r in records for i, why in r["skipped"]]}
        finish_pool(pool)
    finish(dst, manifest)
    files.remove_tree(os.path.join(dst, WORK))
    return counts


def write_wids_index(dst: str, split: str, shards: list[dict]) -> None:
    """The shard index wids reads (`wids.ShardListDataset(DST/<split>.wids.json)`, as its
    `widsindex create` writes one; urls relative to it, nsamples = WebDataset samples per shard)."""
    index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": split,
             "shardlist": [{"url": s["file"], "nsamples": s.get("wds_samples", s["samples"]),
                            "filesize": s["bytes"]} for s in shards]}
    files.write_text(os.path.join(dst, wids_name(split)), json.dumps(index, indent=1))


def write_dali_index(shard: str) -> None:
    """SHARD.idx beside it, the index DALI's `fn.readers.webdataset` takes (`index_paths`), as its
    wds2idx writes one: `v1.2 <samples>`, then per sample `ext data_offset size name` per member."""
    samples, last = [], None
    with tarfile.open(shard, "r:") as tar:
        for m in tar:
            if m.isfile():
                key = wds_key(m.name)
                if key != last:
                    samples.append([])
                samples[-1].append(f"{m.name[len(key) + 1:]} {m.offset_data} {m.size} {m.name}")
                last = key
    lines = [f"v1.2 {len(samples)}"] + [" ".join(sample) for sample in samples]
    files.write_text(os.path.splitext(shard)[0] + ".idx", "\n".join(lines) + "\n")


def finish(dst: str, manifest: dict) -> None:
    """The wids and DALI indexes, SHA256SUMS, then pack.json: its presence says the pack is whole."""
    for split, entry in manifest["splits"].items():
        write_wids_index(dst, split, entry["shards"])
        for shard in entry["shards"]:
            write_dali_index(os.path.join(dst, shard["file"]))
    sums = "".join(f"{s['sha256']}  {s['file']}\n" for e in manifest["splits"].values() for s in e["shards"])
    files.write_text(os.path.join(dst, "SHA256SUMS"), sums)
    files.write_text(os.path.join(dst, PACK_MANIFEST), json.dumps(manifest, indent=1))
