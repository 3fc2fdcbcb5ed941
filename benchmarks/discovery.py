"""Neighbourhood discovery: our `discover()` against the released AND code's algorithm.

What is measured (one process, same random unit-vector bank for everything, dim 128, T = 0.1,
k = 1, anchor rate 0.25 x round 1, i.e. 25% anchors):

  reference  a plain reimplementation of the released AND code (`reference()` below):
             (a) entropy of softmax(bank[chunk] @ bank.T / T) for row chunks of 100,
             (b) anchors = the round(N x rate x round) lowest-entropy samples,
             (c) anchor neighbours: sims = bank[anchors] @ bank.T, self-sim set to -1, top-k,
             (d) the per-sample position loop: for each i in range(N) a Python-level search
                 `(anchors == i).nonzero()` over the anchor list, O(N x anchors).
             With --loop-sample S < N, step (d) is timed on the first S samples and
             extrapolated linearly to N (the table says so).
  ours       and_dist.discovery.discover(bank, T, k, chunk) + select_anchors(): entropy and the
             neighbours of every row in one pass, anchors as a boolean mask (no position loop).
             Timed for backend torch/fp32, faiss/fp32 and torch/bf16.

Every line reports seconds and the ratio reference / that configuration, all from this run,
and whether it finds the same anchors as the reference and the same neighbours for them
(with counts of any differences: fp32 entropies computed in different orders can swap
samples that sit exactly at the anchor cut-off; bf16 entropies are coarser by design).

Each figure is the median [min-max] of --repeats runs (default 5), reference and ours interleaved.

Run:   .venv/bin/python benchmarks/discovery.py                      # N = 10000, 50000
       .venv/bin/python benchmarks/discovery.py --sizes 5000 --loop-sample 1000 --repeats 1  # quick
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from and_dist.method.bank import ShardedBank
from and_dist.method.curriculum import anchor_count, select_anchors
from and_dist.method.discovery import discover


def reference(bank: torch.Tensor, k: int, count: int, T: float, loop_sample: int | None):
    """The released AND code's discovery.
    Returns (entropy, anchors, neighbours, timings, loop extrapolated?)."""
    n = len(bank)
    times = {}
    t0 = time.perf_counter()
    entropy = torch.empty(n)
    for a in range(0, n, 100):                                   # (a) entropy, chunks of 100
        p = F.softmax(bank[a:a + 100] @ bank.T / T, dim=1)
        entropy[a:a + 100] = -(p * p.log()).sum(1)
    t1 = time.perf_counter()
    anchors = entropy.topk(count, largest=False).indices          # (b) lowest-entropy anchors
    t2 = time.perf_counter()
    neighbours = torch.empty(count, k, dtype=torch.long)
    for a in range(0, count, 100):                               # (c) anchor neighbours
        idx = anchors[a:a + 100]
        sims = bank[idx] @ bank.T
        sims.scatter_(1, idx[:, None], -1.0)
        neighbours[a:a + 100] = sims.topk(k, dim=1).indices
    t3 = time.perf_counter()
    m = n if loop_sample is None else min(loop_sample, n)
    position = torch.full((n,), -1, dtype=torch.long)
    for i in range(m):                                           # (d) per-sample position loop
        hit = (anchors == i).nonzero()
        if len(hit):
            position[i] = hit[0, 0]
    t4 = time.perf_counter()
    times = {"entropy": t1 - t0, "anchors": t2 - t1, "neighbours": t3 - t2,
             "loop": (t4 - t3) * n / m}
    return entropy, anchors, neighbours, times, m < n


def ours(bank: ShardedBank, temperature: float, k: int, count: int, chunk: int, backend: str, precision: str):
    t0 = time.perf_counter()
    nbhd = discover(bank, temperature, k=k, chunk=chunk, backend=backend, precision=precision)
    anchor = select_anchors(nbhd.entropy, count)
    return anchor, nbhd.neighbours, time.perf_counter() - t0


def _spread(xs: list[float]) -> str:
    """median [min-max]: the figure to quote from a noisy machine."""
    return f"{statistics.median(xs):.2f} [{min(xs):.2f}-{max(xs):.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 50000])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=0.1)
    ap.add_argument("--rate", type=float, default=0.25)
    ap.add_argument("--round", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=2048, help="row chunk of our discover()")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--loop-sample", type=int, default=None,
                    help="time the reference's position loop on this many samples, extrapolate to N")
    ap.add_argument("--repeats", type=int, default=5,
                    help="runs per method; one run on a shared machine is noise")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    configs = [("torch", "fp32"), ("faiss", "fp32"), ("torch", "bf16")]
    print(f"threads={torch.get_num_threads()} dim={args.dim} T={args.temperature} k={args.k} "
          f"anchors={args.rate:g}x{args.round} chunk={args.chunk}")
    head = (f"{'N':>7} {'method':<22} {'seconds':>22} {'ref/this':>17} {'anchors':>8} "
            f"{'match':>6} {'anc_diff':>8} {'nbr_diff':>8} {'cut_gap':>8}")
    print(head)
    print("-" * len(head))
    warm = ShardedBank(1000, args.dim, seed=1)  # warm-up, untimed
    reference(warm.rows, args.k, 250, args.temperature, 10)
    for backend, precision in configs:
        ours(warm, args.temperature, args.k, 250, args.chunk, backend, precision)
    for n in args.sizes:
        bank = ShardedBank(n, args.dim, seed=0)
        count = anchor_count(args.round, n, args.rate)
        ref_runs, runs = [], {c: [] for c in configs}
        for _ in range(args.repeats):        # interleaved, so each ratio pairs runs of one moment
            ref_h, ref_a, ref_nb, rt, extrapolated = reference(bank.rows, args.k, count,
                                                               args.temperature, args.loop_sample)
            ref_runs.append(sum(rt.values()))
            for c in configs:
                runs[c].append(ours(bank, args.temperature, args.k, count, args.chunk, *c))
        note = " (loop extrapolated)" if extrapolated else ""
        print(f"{n:>7} {'reference':<22} {_spread(ref_runs):>22} {'1.00':>17} {count:>8}")
        print(f"{'':>7}   last run: entropy {rt['entropy']:.2f}s, anchors {rt['anchors']:.3f}s, "
              f"neighbours {rt['neighbours']:.2f}s, position loop {rt['loop']:.2f}s{note}")
        ref_mask = torch.zeros(n, dtype=torch.bool)
        ref_mask[ref_a] = True
        cut = ref_h[ref_a].max()                                    # reference entropy cut-off
        for c in configs:
            mask, nb, _ = runs[c][-1]
            seconds = [r[2] for r in runs[c]]
            ratios = [r / s for r, s in zip(ref_runs, seconds)]
            anc_diff = int((mask & ~ref_mask).sum())                # anchors of ours not in ref
            common = ref_a[mask[ref_a]]                             # anchors both chose
            pos = torch.nonzero(mask[ref_a])[:, 0]
            nbr_diff = int((nb[common] != ref_nb[pos]).any(1).sum())
            match = anc_diff == 0 and nbr_diff == 0
            gap = (ref_h[mask & ~ref_mask].max() - cut).item() if anc_diff else 0.0
            name = f"ours {c[0]}/{c[1]}"
            print(f"{n:>7} {name:<22} {_spread(seconds):>22} {_spread(ratios):>17} {count:>8} "
                  f"{str(match):>6} {anc_diff:>8} {nbr_diff:>8} {gap:>8.1e}")
    print(f"each cell: median [min-max] of {args.repeats} runs; ref/this pairs the reference and "
          "this method run after it.")
    print("ref/this = reference seconds / this method's seconds, both measured in this run.")
    print("anc_diff = anchors chosen here but not by the reference; nbr_diff = shared anchors "
          "whose neighbours differ.")
    print("cut_gap = largest (reference entropy of an anchor only we chose) - (reference's "
          "entropy cut-off): how far past the cut-off the differing anchors are.")
    print("bf16 computes entropies from bf16 similarities, so anchors near the entropy cut-off "
          "can differ from fp32 by design; its neighbours are re-ranked in fp32.")


if __name__ == "__main__":
    main()
