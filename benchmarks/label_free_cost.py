"""What the label-free neighbourhood measures cost beside the discovery they follow, on a trained
run's own model, bank and data (one process): discovery (its configured kernel), mutual_rate,
round_stability and view_agreement on a sample of `--sample` rows; median of `--repeats` timings
each, in seconds, and each measure's ratio to discovery.

Run:  .venv/bin/python benchmarks/label_free_cost.py RUN [--sample 1024] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a run directory of this project")
    ap.add_argument("--sample", type=int, default=1024, help="rows view_agreement is measured on")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    from and_dist.data import build_data
    from and_dist.eval.pretrained import load_model
    from and_dist.method.bank import ShardedBank
    from and_dist.method.discovery import discover
    from and_dist.method.label_free import kept, mutual, view_neighbours, view_sample
    from and_dist.platform.dist import init
    from and_dist.run import checkpoint
    torch.set_num_threads(args.threads)
    model, cfg, ckpt = load_model(args.run)
    data = build_data(cfg, init("cpu"), None, lambda *_: None, False)
    bank = ShardedBank(len(data.train), cfg.model.low_dim)
    checkpoint.load(ckpt, {"bank": bank})
    k, d = cfg.curriculum.neighbours, cfg.discovery
    find = lambda: discover(bank, cfg.bank.temperature, k=k, chunk=d.chunk, backend=d.backend,  # noqa: E731
                            precision=d.precision, kernel=d.kernel)
    nbhd = find()
    previous = torch.roll(nbhd.neighbours, 1, 0)
    sample = view_sample(bank.n, args.sample, cfg.train.seed)
    costs = {"discovery": timed(find, args.repeats),
             "mutual_rate": timed(lambda: mutual(nbhd.neighbours), args.repeats),
             "round_stability": timed(lambda: kept(previous, nbhd.neighbours), args.repeats),
             f"view_agreement ({len(sample)} rows)": timed(
                 lambda: view_neighbours(model, data, bank, sample, cfg.train.seed, 1, torch.float32), args.repeats)}
    print(f"{ckpt}: N={bank.n}, D={bank.dim}, k={k}, {cfg.model.arch} at {cfg.data.image_size} px, "
          f"{args.threads} threads, median of {args.repeats}")
    for name, s in costs.items():
        print(f"  {name:<28} {s:8.4f} s  ({s / costs['discovery']:.3g} x discovery)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
