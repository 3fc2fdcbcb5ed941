"""Sharded neighbourhood discovery at scale: seconds and per-rank memory of `discover()`.

What is measured: `discover(bank, k=1, chunk, backend, precision)` on a random unit-vector
ShardedBank (dim 128, T = 0.1) for each N in --sizes, W in --worlds (gloo processes under
torchrun, --threads per rank, default cores // W so every W uses the same cores) and each of
torch/fp32, faiss/fp32, torch/bf16. Each configuration is a fresh torchrun job, so peak-memory
figures do not leak between them. Reported per configuration: seconds (slowest rank, after an
untimed warm-up on a small bank), bank MiB per rank (exact tensor bytes), peak RSS delta per
rank (peak resident memory during discovery minus RSS before the bank was allocated; the
high-water mark is reset after building the bank via /proc/self/clear_refs; max over ranks),
and the ratios faiss/torch and bf16/fp32 (seconds and peak RSS) at the same N and W, all from
this run.

Full discovery is N^2 x dim multiply-adds plus an exp over every similarity (1.28M: ~2e14 flop),
far too slow on a small CPU. So by default each rank stops after --max-rows of its own rows
(default 8192, i.e. 4 chunks of 2048) against the first bank slice, and the seconds are
extrapolated linearly to all N/W rows x W slices (the work per row chunk is the same for
every chunk); the table marks such rows "extrap". The peak memory of one chunk block is
reached in the first chunk, so peak RSS is measured, not extrapolated (it misses only the
second bank slice a rank holds during the ring pass, N/W x dim x 4 bytes). Use --max-rows 0
for complete runs. The similarity block is chunk x N/W; at N = 1.28M lower --chunk (e.g. 256)
or it needs tens of GB per rank.

One device (--device cuda or cpu): every discovery kernel (fused bf16x3 / bf16 on CUDA, attention,
exact) and the released algorithm on a structured bank (clustered rows of varying spread) and a
random one: seconds, peak memory beyond the bank, agreement with the exact path.

Run:  .venv/bin/python benchmarks/discovery_scale.py --device cuda --sizes 100000 1281167
      .venv/bin/python benchmarks/discovery_scale.py --device cpu --sizes 20000 --threads 2
      .venv/bin/python benchmarks/discovery_scale.py --sizes 100000 --worlds 1 2      # minutes
      .venv/bin/python benchmarks/discovery_scale.py --sizes 20000 --worlds 1 2 --max-rows 2048  # quick
      full (hours on 2 cores): .venv/bin/python benchmarks/discovery_scale.py \\
          --sizes 100000 500000 1281167 --worlds 1 2 --max-rows 0 --chunk 256
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from common import REPO, MiB, peak_rss, reset_peak_rss, torchrun

sys.path.insert(0, str(REPO))
CONFIGS = [("torch", "fp32"), ("faiss", "fp32"), ("torch", "bf16")]






class _Stop(Exception):
    pass


# ----------------------------------------------------------------------------------- worker

def worker(args) -> None:
    import torch

    from and_dist.platform import dist
    from and_dist.method.bank import ShardedBank
    from and_dist.method.discovery import discover

    env = dist.init("cpu")
    torch.set_num_threads(args.threads)
    discover(ShardedBank(4000, args.dim, seed=1), 0.1, k=1, chunk=args.chunk,      # warm-up, untimed
             backend=args.backend, precision=args.precision)

    base = peak_rss()
    bank = ShardedBank(args.rows, args.dim, seed=0)
    reset = reset_peak_rss()
    # Stop early only inside the first slice, where every rank does the same number of chunks.
    cap = args.max_rows if 0 < args.max_rows < min(bank.sizes) else None
    done = 0

    def progress(rows):
        nonlocal done
        done += rows
        if cap is not None and done >= cap:
            raise _Stop

    dist.barrier()
    t0 = time.perf_counter()
    try:
        discover(bank, 0.1, k=1, chunk=args.chunk, backend=args.backend, precision=args.precision,
                 progress=progress)
    except _Stop:
        pass
    seconds = time.perf_counter() - t0
    if cap is not None:
        seconds *= len(bank.rows) * env.world / done            # own rows x every slice
    stats = torch.tensor([seconds, bank.rows.numel() * bank.rows.element_size(), peak_rss() - base],
                         dtype=torch.float64)
    dist.all_reduce(stats, "max")
    if env.is_main:
        with open(args.results, "a") as f:
            f.write(json.dumps({"n": args.rows, "world": env.world, "backend": args.backend,
                                "precision": args.precision, "seconds": stats[0].item(),
                                "bank_bytes": int(stats[1]), "peak_rss_delta": int(stats[2]),
                                "extrapolated_from_rows": done if cap is not None else None,
                                "threads": args.threads, "hwm_reset": reset}) + "\n")
    dist.shutdown()


# ----------------------------------------------------------------------------------- parent



def launch(args, world: int, n: int, backend: str, precision: str, threads: int, results: str) -> dict:
    torchrun(__file__, world, ["--rows", str(n), "--backend", backend, "--precision", precision,
                               "--chunk", str(args.chunk), "--dim", str(args.dim),
                               "--max-rows", str(args.max_rows), "--threads", str(threads),
                               "--results", results],
             threads=threads, label=f"W={world} N={n} {backend}/{precision}")
    with open(results) as f:
        return json.loads(f.readlines()[-1])


def parent(args) -> None:
    cores = os.cpu_count() or 1
    results = args.results or tempfile.mktemp(suffix=".jsonl", prefix="discovery_scale-")
    print(f"dim {args.dim}, k=1, chunk {args.chunk}, {cores} CPU cores, "
          f"max-rows {args.max_rows or 'all'}; results in {results}", flush=True)
    rows = {}
    for n in args.sizes:
        for world in args.worlds:
            threads = args.threads or max(1, cores // world)
            for backend, precision in CONFIGS:
                t0 = time.time()
                rows[n, world, backend, precision] = launch(args, world, n, backend, precision, threads, results)
                print(f"  ran N={n} W={world} {backend}/{precision} in {time.time() - t0:.0f}s", flush=True)
    head = (f"{'N':>8} {'W':>2} {'thr':>3} {'config':<12} {'seconds':>9} {'timing':<7} "
            f"{'bank MiB/rank':>13} {'peakRSS MiB':>11} {'s/torch-fp32':>12} {'RSS/torch-fp32':>14}")
    print(head)
    print("-" * len(head))
    for n in args.sizes:
        for world in args.worlds:
            ref = rows[n, world, "torch", "fp32"]
            for backend, precision in CONFIGS:
                r = rows[n, world, backend, precision]
                how = "extrap" if r["extrapolated_from_rows"] else "full"
                print(f"{n:>8} {world:>2} {r['threads']:>3} {backend + '/' + precision:<12} "
                      f"{r['seconds']:>9.1f} {how:<7} {r['bank_bytes'] / MiB:>13.1f} "
                      f"{r['peak_rss_delta'] / MiB:>11.1f} {r['seconds'] / ref['seconds']:>12.2f} "
                      f"{r['peak_rss_delta'] / max(ref['peak_rss_delta'], 1):>14.2f}")
    print("ratios: faiss/fp32 row = faiss/torch, torch/bf16 row = bf16/fp32, at the same N and W.")
    print("seconds: slowest rank; extrap = timed on the first --max-rows rows per rank and "
          "scaled linearly to the full pass. peakRSS = peak RSS delta per rank over the RSS "
          "before the bank was allocated (max over ranks).")
    if not all(r["hwm_reset"] for r in rows.values()):
        print("note: /proc/self/clear_refs unavailable, so peak RSS includes bank initialisation.")


# ------------------------------------------------------------- one device: kernels vs exact vs released

def released(rows, k: int, count: int, T: float, loop_sample: int):
    """The released AND code's discovery on one device: softmax entropy in chunks of 100 rows,
    the lowest-entropy anchors, their neighbours in chunks of 100, then the per-sample position
    loop (timed on `loop_sample` samples and scaled to N). Returns (entropy, neighbours of the
    anchors, anchor mask, seconds)."""
    import torch
    n = len(rows)
    t0 = time.perf_counter()
    entropy = torch.empty(n, device=rows.device)
    for a in range(0, n, 100):
        logp = (rows[a:a + 100] @ rows.T / T).log_softmax(1)
        entropy[a:a + 100] = -(logp.exp() * logp).sum(1)
    anchors = entropy.topk(count, largest=False).indices
    neighbours = torch.empty(count, k, dtype=torch.long, device=rows.device)
    for a in range(0, count, 100):
        idx = anchors[a:a + 100]
        sims = rows[idx] @ rows.T
        sims.scatter_(1, idx[:, None], -1.0)
        neighbours[a:a + 100] = sims.topk(k, dim=1).indices
    mask = torch.zeros(n, dtype=torch.bool, device=rows.device)
    mask[anchors] = True
    t1 = time.perf_counter()
    m = min(loop_sample, n)
    for i in range(m):                                           # the per-sample position loop
        (anchors == i).nonzero()
    loop = (time.perf_counter() - t1) * n / m
    return entropy.double().cpu(), anchors.cpu(), neighbours.cpu(), mask.cpu(), t1 - t0 + loop


def single(*, device: str, sizes: list[int], dim: int, chunk, banks: list[str], rate: float, released_max: int,
           loop_sample: int, skip=(), threads: int = 0) -> list[dict]:
    """One process on `device`: each discovery kernel against the exact path and the released
    algorithm, on a structured bank (and a random one): seconds, peak memory beyond the bank and
    agreement with the exact path (anchors at rate x round, neighbours, entropy)."""
    import torch

    from and_dist.method.bank import ShardedBank
    from and_dist.method.curriculum import anchor_count, select_anchors
    from and_dist.method.discovery import discover, fused_available
    from common import device_peak, structured_rows

    dev = torch.device(device)
    if dev.type == "cpu" and threads:
        torch.set_num_threads(threads)
    methods = [("exact", "fp32"), ("attention", "fp32")]
    if fused_available(dev):
        methods = [("fused", "bf16x3"), ("fused", "bf16"), *methods]
    methods = [m for m in methods if f"{m[0]}/{m[1]}" not in skip]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    print(f"device {name}, dim {dim}, T 0.1, k 1, anchors {rate:g} x round 1, chunk {chunk}",
          flush=True)
    warm = ShardedBank(3000, dim, seed=1, device=dev)
    for kernel, precision in methods:                                    # compile / warm up, untimed
        discover(warm, 0.1, k=1, chunk="auto", kernel=kernel, precision=precision)
    head = (f"{'N':>8} {'bank':<10} {'method':<16} {'seconds':>8} {'x exact':>8} {'peak MiB':>9} "
            f"{'anchors=':>9} {'nbrs=':>8} {'anc nbrs=':>9} {'max |dH|':>9}")
    print(head + "\n" + "-" * len(head), flush=True)
    out = []
    for n in sizes:
        for kind in banks:
            bank = ShardedBank(n, dim, device=dev)
            if kind == "structured":
                bank.rows.copy_(structured_rows(n, dim, device=dev))
            count = anchor_count(1, n, rate)
            runs = {}
            for kernel, precision in methods:
                t0 = time.perf_counter()
                nb, peak = device_peak(dev, lambda: discover(bank, 0.1, k=1, chunk=chunk, kernel=kernel, precision=precision))
                runs[f"{kernel}/{precision}"] = (time.perf_counter() - t0, peak, nb.entropy, nb.neighbours,
                                                 select_anchors(nb.entropy, count))
            if n <= released_max:
                t0 = time.perf_counter()
                (h, anchors, nbrs, mask, secs), peak = device_peak(
                    dev, lambda: released(bank.rows, 1, count, 0.1, loop_sample))
                full = torch.full((n, 1), -1, dtype=torch.long)
                full[anchors] = nbrs
                runs["released"] = (secs, peak, h, full, mask)
            ex = runs["exact/fp32"]
            for method, (secs, peak, h, nbrs, mask) in runs.items():
                both = mask & ex[4]
                same_nbr = (nbrs == ex[3]).all(1)
                out.append({"n": n, "bank": kind, "method": method, "seconds": secs, "peak_bytes": peak,
                            "anchors_equal": both.sum().item() / max(count, 1),
                            "anchor_nbrs_equal": same_nbr[both].double().mean().item(),
                            "max_dh": (h - ex[2]).abs().max().item()})
                print(f"{n:>8} {kind:<10} {method:<16} {secs:>8.2f} {ex[0] / secs:>8.2f} {peak / MiB:>9.1f} "
                      f"{both.sum().item() / max(count, 1):>9.5f} "
                      f"{same_nbr.double().mean().item() if method != 'released' else float('nan'):>8.5f} "
                      f"{same_nbr[both].double().mean().item():>9.5f} {(h - ex[2]).abs().max().item():>9.1e}",
                      flush=True)
            del bank
    print("anchors= share of the exact path's anchors also chosen; nbrs= rows whose neighbour equals the "
          "exact path's; anc nbrs= the same over shared anchors (the only neighbours AND uses); "
          "max |dH| = largest entropy difference from the exact path. released: position loop timed on "
          "--loop-sample samples and scaled to N. peak = device memory beyond the bank (CPU: peak RSS growth).")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--max-rows", type=int, default=8192,
                    help="rows per rank to time before extrapolating; 0 = full discovery")
    ap.add_argument("--threads", type=int, default=0, help="threads per rank (default cores // W)")
    ap.add_argument("--results", default=None, help="JSON-lines file (default: a temp file)")
    ap.add_argument("--device", default=None, help="cpu or cuda: one process, every kernel vs exact vs released")
    ap.add_argument("--banks", nargs="+", default=["structured", "random"], choices=("structured", "random"))
    ap.add_argument("--rate", type=float, default=0.25)
    ap.add_argument("--released-max", type=int, default=2_000_000)
    ap.add_argument("--loop-sample", type=int, default=2000)
    ap.add_argument("--skip", nargs="*", default=[], help="methods to leave out, e.g. attention/fp32")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--backend", choices=("torch", "faiss"), help=argparse.SUPPRESS)
    ap.add_argument("--precision", choices=("fp32", "bf16"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device:
        single(device=args.device, sizes=args.sizes, dim=args.dim, banks=args.banks, rate=args.rate,
               chunk="auto" if args.chunk == 2048 and "--chunk" not in sys.argv else args.chunk,
               released_max=args.released_max, loop_sample=args.loop_sample, skip=args.skip, threads=args.threads)
    else:
        worker(args) if args.worker else parent(args)


if __name__ == "__main__":
    main()
