"""Checkpoint save of a 1.28M-row memory bank: what durability and checksums cost.

  python benchmarks/checkpoint_save.py [--rows 1281167] [--dim 128] [--dir /tmp] [--repeats 3]

One process, the bank as the one sharded owner (N x dim float32, 656 MB at the default size)
and a small replicated owner, saved into --dir (its file system is what is measured). Three ways:

  plain        the former save: torch.save to the path, os.replace, no fsync, no checksum
  durable      checkpoint.save with the checksum swapped for a no-op: fsync of every file and
               directory, the manifest
  checksummed  checkpoint.save as it runs: durable + xxh3_64 of every byte while it is written

and `verify`, the check a resume makes (read back and checksum every file; from the page cache
here, right after the save), and `xxh3 alone`, the checksum's CPU time over the bank in memory
(what checksumming adds to a save, free of the disk's noise). Each figure is the median of --repeats rounds, the three ways interleaved
(the checkpoint removed between saves). The page cache is not dropped: the fsync is what reaches the disk.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from xxhash import xxh3_64  # noqa: E402

from and_dist.run import checkpoint
from and_dist.platform import files  # noqa: E402
from and_dist.method.bank import ShardedBank  # noqa: E402


class _NoHash:
    def update(self, data):
        pass

    def hexdigest(self):
        return ""


def plain_save(root: Path, name: str, owners: dict) -> None:
    tmp = root / f".tmp-{name}"
    tmp.mkdir(parents=True)
    torch.save(owners["bank"].state_dict(), tmp / "bank-0.pt")
    torch.save({"progress": owners["progress"].state_dict()}, tmp / "state.pt")
    os.replace(tmp, root / name)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1281167)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    bank = ShardedBank(args.rows, args.dim, seed=0)
    progress = type("Progress", (), {"global_step": 1, "state_dict": lambda self: {"step": 1}})()
    owners = {"bank": bank, "progress": progress}
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="ckpt-bench-"))
    mb = bank.rows.numel() * bank.rows.element_size() / 2 ** 20
    times = {how: [] for how in ("plain", "durable", "checksummed", "verify", "xxh3 alone")}
    try:
        for _ in range(args.repeats):            # interleaved: the disk's mood hits all alike
            for how in ("plain", "durable", "checksummed"):
                shutil.rmtree(root / "c", ignore_errors=True)
                if how == "plain":
                    times[how].append(timed(lambda: plain_save(root, "c", owners)))
                    continue
                files.HASH = _NoHash if how == "durable" else xxh3_64
                times[how].append(timed(lambda: checkpoint.save(root, "c", owners, keep=1)))
            times["verify"].append(timed(lambda: checkpoint.verify(root / "c")))
            times["xxh3 alone"].append(timed(lambda: xxh3_64(bank.rows.numpy()).hexdigest()))
    finally:
        files.HASH = xxh3_64
        shutil.rmtree(root, ignore_errors=True)
    out = {how: statistics.median(t) for how, t in times.items()}
    print(f"bank {args.rows} x {args.dim} float32 ({mb:.0f} MiB) into {args.dir}, median of {args.repeats}")
    for how, secs in out.items():
        print(f"  {how:<12} {secs:6.2f} s  {mb / secs:6.0f} MiB/s")


if __name__ == "__main__":
    main()
