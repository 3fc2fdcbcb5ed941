"""A packed split: its encoded images in a few large tar shards, read at random by sample index.

Why: on a cluster file system (Lustre, GPFS, NFS) opening a file costs a metadata round trip, and
ImageNet is 1.28M small files. A pack holds the same bytes in shards of about 1 GB, so a loader
opens a few files once and reads each sample with one positional read (os.pread) at the offset
the index gives. The sampler stays authoritative: sample i is bank row i, as with the tree.

Why tar: every system can list, check and unpack it (`tar tvf`, `tar xf` gives the tree back,
`sha256sum -c SHA256SUMS` checks the shards); a member's bytes lie contiguous after its 512-byte
header, so an offset index is all random access needs. The shards follow WebDataset's conventions
(version 2 on: each image is followed by its label as `<key>.cls`, `<split>.wids.json` is the
shard index wids reads, `<shard>.idx` DALI's), so webdataset, wids and DALI take them as they are;
`prepare SRC DST --pack` also indexes WebDataset shards made elsewhere (pack_wds.py). Version 1
packs (no .cls members) read as before.

A pack folder holds
  pack.json              classes, and per split: its source folder, shards (file, bytes, sha256,
                         samples) and the images left out when it was made
  <split>-index.npz      per sample: shard, offset, length, label, (height, width), format, name
  <split>-NNNNN.tar      the shards;  SHA256SUMS  their checksums in sha256sum's format
  <split>.wids.json      the split's shard index for wids;  <split>-NNNNN.idx  DALI's (version 2 on)
Splits are "train" and "test" (the tree's test/ or val/, whose name the members keep).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ...platform.errors import UserError
from ...platform.log import progress_bar
from ..base import SplitInfo
from . import PACK_MANIFEST

FORMAT, VERSION = "and_dist pack", 2
READS = (1, 2)                  # 1: before the .cls members and the wids index
PACK_SPLITS = ("train", "test")
HASH_BLOCK = 8 << 20


def index_name(split: str) -> str:
    return f"{split}-index.npz"


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:05d}.tar"


def wids_name(split: str) -> str:
    return f"{split}.wids.json"


def wds_key(name: str) -> str:
    """A member's WebDataset sample key: its path up to the first dot of its file name (the rule
    of webdataset and wids; members with one key form one sample)."""
    folder, _, base = name.rpartition("/")
    return f"{folder}/{base.split('.', 1)[0]}" if folder else base.split(".", 1)[0]


def read_manifest(root: str) -> dict:
    path = os.path.join(root, PACK_MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"pack {root}: {PACK_MANIFEST} is unreadable ({type(e).__name__}: {e})") from None
    if m.get("format") != FORMAT or m.get("version") not in READS:
        raise UserError(f"pack {root}: {PACK_MANIFEST} is not an and_dist pack of version {' or '.join(map(str, READS))} "
                        f"(format {m.get('format')!r}, version {m.get('version')!r}); make it again with "
                        "python -m and_dist.prepare SRC DST --pack")
    return m


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


class PackSplit:
    """One split of a pack, with the interface the loaders use of a file index (index.FileIndex):
    labels, sizes, formats, `read(i)` (the encoded bytes) and `source(i)` (what PIL opens)."""

    def __init__(self, root: str, split: str, manifest: dict):
        self.root, self.split = root, split
        entry = manifest["splits"][split]
        self.shards = entry["shards"]
        self.classes = list(manifest["classes"])
        self.skipped = [tuple(s) for s in entry["skipped"]]
        try:
            with np.load(os.path.join(root, index_name(split)), allow_pickle=False) as z:
                self.shard, self.offset, self.length = z["shard"], z["offset"], z["length"]
                self.labels, self.sizes, self.format_id = z["label"], z["sizes"], z["format_id"]
                self.formats = [str(f) for f in z["formats"]]
                blob = z["names"].tobytes().decode("utf-8", "surrogateescape")
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"pack {root}: {index_name(split)} is unreadable ({type(e).__name__}: {e}); "
                            "make the pack again") from None
        self.names = blob.split("\0") if blob else []
        self._fds: dict[int, int] = {}
        self._pid, self._opening = os.getpid(), threading.Lock()

    def __len__(self) -> int:
        return len(self.labels)

    def _fd(self, k: int) -> int:
        if self._pid != os.getpid():          # a forked worker opens its own descriptors
            self._fds, self._pid, self._opening = {}, os.getpid(), threading.Lock()
        fd = self._fds.get(k)
        if fd is None:
            with self._opening:                # reader threads (DALI's read-ahead) share descriptors
                fd = self._fds.get(k)
                if fd is None:
                    fd = self._fds[k] = os.open(os.path.join(self.root, self.shards[k]["file"]), os.O_RDONLY)
        return fd

    def read(self, i: int) -> bytes:
        """The encoded image of sample i: one positional read."""
        data = os.pread(self._fd(int(self.shard[i])), int(self.length[i]), int(self.offset[i]))
        if len(data) != self.length[i]:
            raise UserError(f"pack {self.root}: {self.shards[self.shard[i]]['file']} ends inside sample {i} "
                            "(truncated since the start)")
        return data

    def source(self, i: int) -> io.BytesIO:
        return io.BytesIO(self.read(i))

    def path(self, i: int) -> str:
        """Where sample i lies, for messages: shard:member."""
        return f"{os.path.join(self.root, self.shards[self.shard[i]]['file'])}:{self.names[i]}"

    def format_of(self, i: int) -> str:
        return self.formats[self.format_id[i]]

    def info(self) -> SplitInfo:
        return SplitInfo(torch.from_numpy(self.labels.astype(np.int64)), list(self.classes), list(self.skipped),
                         self.path)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_fds", "_opening")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _fds={}, _opening=threading.Lock())

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    # ------------------------------------------------------------------------------ checks

    def check_index(self) -> None:
        """The index matches its shards: every field has N rows, every sample lies inside its shard
        right after a tar header of its size and name (the first and last of each shard and a
        spread between are read: 512 bytes each)."""
        n, where = len(self.labels), f"pack {self.root}: {index_name(self.split)}"
        fields = (self.shard, self.offset, self.length, self.sizes, self.format_id)
        if any(len(a) != n for a in fields) or len(self.names) != n or \
                n != sum(s["samples"] for s in self.shards):
            raise UserError(f"{where} does not match {PACK_MANIFEST} (sample counts differ); make the pack again")
        if n and (self.shard.min() < 0 or self.shard.max() >= len(self.shards)):
            raise UserError(f"{where} names shards {PACK_MANIFEST} does not list; make the pack again")
        ends = self.offset + self.length
        limits = np.asarray([s["bytes"] for s in self.shards], dtype=np.int64)[self.shard]
        if n and ((self.offset < 512).any() or (ends > limits).any()):
            bad = int(np.flatnonzero((self.offset < 512) | (ends > limits))[0])
            raise UserError(f"{where}: sample {bad} lies outside {self.shards[self.shard[bad]]['file']}; "
                            "the index does not match its shards")
        for k in range(len(self.shards)):
            mine = np.flatnonzero(self.shard == k)
            for i in mine[np.linspace(0, len(mine) - 1, min(len(mine), 9)).astype(int)] if len(mine) else []:
                fd = self._fd(k)
                try:
                    head = tarfile.TarInfo.frombuf(os.pread(fd, 512, int(self.offset[i]) - 512), "utf-8",
                                                   "surrogateescape")
                    ok = head.size == self.length[i] and self.names[i].startswith(head.name.rstrip("/"))
                except tarfile.TarError:
                    ok = False
                if not ok:
                    raise UserError(f"{where}: sample {i} ({self.names[i]}) is not where the index says in "
                                    f"{self.shards[k]['file']}; the index does not match its shards")


def check_shards(root: str, manifest: dict, cache_dir: str | None, workers: int, log=print) -> None:
    """Every shard is whole: its size (always) and its sha256 (once per shard file, remembered in
    cache_dir by path, size and mtime: hashing 140 GB at every start would cost minutes)."""
    todo = []
    for split in PACK_SPLITS:
        for s in manifest["splits"][split]["shards"]:
            path = os.path.join(root, s["file"])
            try:
                st = os.stat(path)
            except OSError:
                raise UserError(f"pack shard {path} is missing; restore it or make the pack again") from None
            if st.st_size != s["bytes"]:
                raise UserError(f"pack shard {path} has {st.st_size} bytes, {PACK_MANIFEST} says {s['bytes']} "
                                "(truncated or altered); restore it or make the pack again")
            stamp = hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{s['sha256']}".encode())
            mark = os.path.join(cache_dir, f"pack-checked-{stamp.hexdigest()[:24]}") if cache_dir else None
            if not (mark and os.path.exists(mark)):
                todo.append((path, s["sha256"], mark))
    if not todo:
        return
    total = sum(os.path.getsize(p) for p, _, _ in todo)
    log(f"checking the sha256 of {len(todo)} pack shard(s), {total / 2**30:.2f} GiB (once: remembered in the cache)")
    bar = progress_bar(len(todo), "sha256 of the pack's shards", False, log, every=30.0, unit="shard")
    with ThreadPoolExecutor(max(1, min(workers, len(todo)))) as pool:
        for (path, want, mark), got in zip(todo, pool.map(sha256_of, [p for p, _, _ in todo])):
            bar.update()
            if got != want:
                raise UserError(f"pack shard {path}: sha256 {got[:16]}... differs from {PACK_MANIFEST}'s {want[:16]}... "
                                "(altered or damaged); restore it or make the pack again")
            if mark:
                os.makedirs(cache_dir, exist_ok=True)
                open(mark, "w").close()


def open_pack(root: str, cache_dir: str | None = None, workers: int = 2, log=print,
              verify: bool = True) -> tuple[PackSplit, PackSplit]:
    """(train, test) of the pack at `root`, checked before any image is read (`verify`: the
    shards' sizes and checksums and the index against them; rank 0 does, the others trust it)."""
    manifest = read_manifest(root)
    missing = [s for s in PACK_SPLITS if s not in manifest.get("splits", {})]
    if missing:
        raise UserError(f"pack {root}: {PACK_MANIFEST} has no {' or '.join(missing)} split; make the pack again")
    if verify:
        check_shards(root, manifest, cache_dir, workers, log)
    splits = tuple(PackSplit(root, split, manifest) for split in PACK_SPLITS)
    for s in splits:
        if verify:
            s.check_index()
        if s.skipped:
            log(f"pack {root}: {len(s.skipped)} {s.split} image(s) were left out when it was made "
                f"(unreadable; listed in {PACK_MANIFEST}), e.g. {s.skipped[0][0]}: {s.skipped[0][1]}")
    return splits
