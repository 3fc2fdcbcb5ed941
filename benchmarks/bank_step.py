"""Memory-bank step: our sharded bank against a replicated bank, per-step time and per-rank memory.

What is measured: one training step of the bank part only (no CNN): features are random unit
vectors with requires_grad, global batch 256 split over W gloo processes, dim 128, positives
from a fixed random 25% anchor set with k = 1 random neighbours (the same for both methods).

  sharded     ours: ShardedBank (rank r holds N/W rows) + positive_sets + and_loss (exact
              distributed logsumexp over the N-way softmax) + backward + bank.update.
  replicated  the VISSL / MoCo-style baseline written below (`ReplicatedBank`): every rank holds
              all N rows, computes logits = feats @ bank.T / T for its own queries, loss =
              -log sum_{j in P(i)} softmax_ij with plain autograd, backward, then all-gathers
              features + indices and applies every update of the global batch to its full copy.

Each (W, N, method) is a fresh `torchrun --nproc_per_node=W` job (OMP_NUM_THREADS=1, one
thread per rank) so that peak-memory figures do not leak between configurations. Workers run
2 warm-up steps, then time --steps steps between barriers (reported: slowest rank's mean
ms/step). Memory per rank: the bank tensor's bytes (exact), and the peak RSS delta = the
process's peak resident memory during the steps minus its RSS before the bank was allocated
(ru_maxrss; the high-water mark is reset after building the bank via /proc/self/clear_refs so
that one-off initialisation temporaries are not counted; max over ranks). The N-sized anchor mask and
neighbour table, which both methods keep on every rank, are allocated before the baseline.
|dloss| is the difference of the step-0 mean loss between the two methods (same bank, same
batch): a check that the baseline computes the same objective.

Rank 0 of each job appends one JSON line to --results; the parent prints the table with the
ratios replicated / sharded measured in this run.

One device (--device cuda or cpu): the attention fast path vs the exact path vs the released
code's replicated softmax on a structured bank (clustered rows), with agreement.

Run:  .venv/bin/python benchmarks/bank_step.py --device cuda --sizes 100000 1281167 --steps 50
      .venv/bin/python benchmarks/bank_step.py --device cpu --sizes 50000 --steps 5 --threads 2
      .venv/bin/python benchmarks/bank_step.py --sizes 100000 500000 --worlds 1 2
      .venv/bin/python benchmarks/bank_step.py                        # N 100k, 500k, 1.28M; W 1, 2, 4
      .venv/bin/python benchmarks/bank_step.py --sizes 20000 --worlds 1 2 --steps 3   # quick
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


# ----------------------------------------------------------------------------------- worker

def worker(args) -> None:
    import torch
    import torch.nn.functional as F

    from and_dist.platform import dist
    from and_dist.method.bank import INIT_BLOCK, ShardedBank
    from and_dist.method.curriculum import positive_sets
    from and_dist.method.loss import and_loss

    env = dist.init("cpu")
    torch.set_num_threads(1)
    n, D, GB, T, m = args.rows, args.dim, args.batch, 0.1, 0.5
    sizes = [b - a for a, b in (dist.shard_range(GB, env.world, r) for r in range(env.world))]
    offset, b = sum(sizes[:env.rank]), sizes[env.rank]
    steps = args.warmup + args.steps

    g = torch.Generator().manual_seed(1)
    anchor = torch.rand(n, generator=g) < 0.25
    neighbours = torch.randint(0, n, (n, 1), generator=g)
    batches = torch.randperm(n, generator=g)[: GB * steps].view(steps, GB)
    feats_all = [F.normalize(torch.randn(GB, D, generator=g), dim=1) for _ in range(steps)]

    class ReplicatedBank:
        """Every rank holds all N rows (same values as ShardedBank) and applies every update."""

        def __init__(self):
            self.rows = torch.empty(n, D)
            for start in range(0, n, INIT_BLOCK):  # ShardedBank's seeded blocks, filled in place
                gb = torch.Generator().manual_seed(0 * 1_000_003 + start // INIT_BLOCK)
                blk = torch.randn(min(INIT_BLOCK, n - start), D, generator=gb)
                self.rows[start: start + len(blk)] = F.normalize(blk, dim=1)

        def step(self, feats, idx):
            positives = positive_sets(idx, anchor, neighbours)          # (b, 1 + k), -1 padded
            logp = (feats @ self.rows.T / T).log_softmax(1)
            pos = logp.gather(1, positives.clamp(min=0)).masked_fill(positives < 0, float("-inf"))
            losses = -pos.logsumexp(1)
            (losses.sum() * env.world / GB).backward()
            with torch.no_grad():
                all_f = dist.all_gather_rows(feats.detach(), sizes)
                all_i = dist.all_gather_rows(idx, sizes)
                mixed = m * self.rows[all_i] + (1 - m) * all_f
                self.rows[all_i] = F.normalize(mixed, dim=1)
            return dist.all_reduce(losses.detach().sum()) / GB

    base = peak_rss()
    if args.method == "sharded":
        bank = ShardedBank(n, D, momentum=m, seed=0)

        def step(feats, idx_all):
            positives = positive_sets(idx_all, anchor, neighbours)
            objective, losses, all_feats = and_loss(feats, positives, bank, sizes, T)
            objective.backward()
            bank.update(idx_all, all_feats)
            return losses.mean()
    else:
        bank = ReplicatedBank()

        def step(feats, idx_all):
            return bank.step(feats, idx_all[offset: offset + b])
    reset = reset_peak_rss()

    def run(s):
        feats = feats_all[s][offset: offset + b].clone().requires_grad_()
        return float(step(feats, batches[s]))

    loss0 = run(0)
    for s in range(1, args.warmup):
        run(s)
    dist.barrier()
    t0 = time.perf_counter()
    for s in range(args.warmup, steps):
        run(s)
    dist.barrier()
    ms = (time.perf_counter() - t0) / args.steps * 1e3

    stats = torch.tensor([ms, bank.rows.numel() * bank.rows.element_size(), peak_rss() - base],
                         dtype=torch.float64)
    dist.all_reduce(stats, "max")
    if env.is_main:
        with open(args.results, "a") as f:
            f.write(json.dumps({"n": n, "world": env.world, "method": args.method, "ms": stats[0].item(),
                                "bank_bytes": int(stats[1]), "peak_rss_delta": int(stats[2]),
                                "loss0": loss0, "hwm_reset": reset}) + "\n")
    dist.shutdown()


# ----------------------------------------------------------------------------------- parent



def launch(args, world: int, n: int, method: str, results: str) -> None:
    torchrun(__file__, world, ["--rows", str(n), "--method", method, "--dim", str(args.dim),
                               "--batch", str(args.batch), "--steps", str(args.steps),
                               "--warmup", str(args.warmup), "--results", results],
             threads=1, label=f"W={world} N={n} {method}")


def parent(args) -> None:
    cores = os.cpu_count() or 1
    results = args.results or tempfile.mktemp(suffix=".jsonl", prefix="bank_step-")
    print(f"global batch {args.batch}, dim {args.dim}, {args.warmup} warm-up + {args.steps} timed steps, "
          f"1 thread per rank, {cores} CPU cores; results in {results}", flush=True)
    if max(args.worlds) > cores:
        print(f"WARNING: timings at W > {cores} (cores) measure oversubscription of the CPU, not "
              f"scaling; memory figures are still exact.", flush=True)
    rows = {}
    for n in args.sizes:
        for world in args.worlds:
            for method in ("sharded", "replicated"):
                t0 = time.time()
                launch(args, world, n, method, results)
                with open(results) as f:
                    rec = json.loads(f.readlines()[-1])
                rows[n, world, method] = rec
                print(f"  ran N={n} W={world} {method} in {time.time() - t0:.0f}s", flush=True)
    head = (f"{'N':>8} {'W':>2} {'shard ms':>9} {'repl ms':>9} {'repl/shard':>10} "
            f"{'shard bank MiB':>14} {'repl bank MiB':>13} {'repl/shard':>10} "
            f"{'shard peakRSS MiB':>17} {'repl peakRSS MiB':>16} {'repl/shard':>10} {'|dloss|':>8}")
    print(head)
    print("-" * len(head))
    for n in args.sizes:
        for world in args.worlds:
            s, r = rows[n, world, "sharded"], rows[n, world, "replicated"]
            print(f"{n:>8} {world:>2} {s['ms']:>9.1f} {r['ms']:>9.1f} {r['ms'] / s['ms']:>10.2f} "
                  f"{s['bank_bytes'] / MiB:>14.1f} {r['bank_bytes'] / MiB:>13.1f} "
                  f"{r['bank_bytes'] / s['bank_bytes']:>10.2f} "
                  f"{s['peak_rss_delta'] / MiB:>17.1f} {r['peak_rss_delta'] / MiB:>16.1f} "
                  f"{r['peak_rss_delta'] / max(s['peak_rss_delta'], 1):>10.2f} "
                  f"{abs(s['loss0'] - r['loss0']):>8.1e}")
    print("ms = mean per timed step, slowest rank; bank MiB = bank tensor bytes per rank (exact); "
          "peakRSS = peak RSS delta per rank during the steps over the RSS before the bank was "
          "allocated (max over ranks).")
    if not all(rec["hwm_reset"] for rec in rows.values()):
        print("note: /proc/self/clear_refs unavailable, so peak RSS includes bank initialisation.")


# ------------------------------------------------------------- one device: fast vs exact vs released

def single(*, device: str, sizes: list[int], steps: int, batch: int, dim: int, released_max: int,
           threads: int = 0, profile: bool = False) -> list[dict]:
    """One process on `device`: the bank step with the attention fast path, with the exact path
    and with the released code's replicated softmax (full logits + autograd), on one structured
    bank; time per step, peak memory beyond the bank, and agreement with the exact path."""
    import functools

    import torch
    import torch.nn.functional as F

    from and_dist.method.kernels.attention import shard_terms_attention
    from and_dist.method.bank import ShardedBank
    from and_dist.method.curriculum import positive_sets
    from and_dist.method.loss import and_loss, shard_terms
    from common import device_peak, measure, structured_rows

    dev = torch.device(device)
    if dev.type == "cpu" and threads:
        torch.set_num_threads(threads)
    timer = (lambda f: measure(f, steps, warmup=2))
    print(f"device {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}, batch {batch}, "
          f"dim {dim}, structured bank, {steps} timed steps", flush=True)
    head = (f"{'N':>8} {'method':<10} {'ms/step':>8} {'x exact':>8} {'GPU ms':>8} {'x exact':>8} "
            f"{'peak MiB':>9} {'|dloss|':>8} {'|dgrad|':>8}")

    def gpu_ms(fn, steps=5):
        """Device time per step: the sum of the kernels' own times (what the step costs once
        the model's kernels keep the GPU busy and the host runs ahead)."""
        from torch.profiler import ProfilerActivity, profile
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                fn()
            torch.cuda.synchronize()
        total = sum(getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
                    for e in prof.key_averages())
        return total / steps / 1e3
    print(head + "\n" + "-" * len(head))
    rows = []
    for n in sizes:
        g = torch.Generator(device=dev).manual_seed(1)
        anchor = torch.rand(n, generator=g, device=dev) < 0.25
        neighbours = torch.randint(0, n, (n, 1), generator=g, device=dev)
        idx = torch.randperm(n, generator=g, device=dev)[:batch]
        feats0 = F.normalize(torch.randn(batch, dim, generator=g, device=dev), dim=1)
        bank = ShardedBank(n, dim, device=dev)
        start = structured_rows(n, dim, device=dev)
        positives = positive_sets(idx, anchor, neighbours)

        def ours(fn):
            def step():
                feats = feats0.clone().requires_grad_()
                objective, losses, all_feats = and_loss(feats, positives, bank, [batch], 0.1, fn)
                objective.backward()
                bank.update(idx, all_feats)
                return losses, feats.grad
            return step

        def released():
            feats = feats0.clone().requires_grad_()
            logp = (feats @ bank.rows.T / 0.1).log_softmax(1)
            pos = logp.gather(1, positives.clamp(min=0)).masked_fill(positives < 0, float("-inf"))
            losses = -pos.logsumexp(1)
            losses.mean().backward()
            with torch.no_grad():
                mixed = bank.momentum * bank.rows[idx] + (1 - bank.momentum) * feats.detach()
                bank.rows[idx] = F.normalize(mixed, dim=1)
            return losses.detach(), feats.grad

        methods = {"attention": ours(shard_terms_attention), "exact": ours(shard_terms), "released": released}
        if dev.type == "cuda":
            methods["attn-sdpa"] = ours(functools.partial(shard_terms_attention, impl="sdpa"))
        if n > released_max:
            methods.pop("released")
        results = {}
        for name, fn in methods.items():
            bank.rows.copy_(start)
            (losses, grad), peak = device_peak(dev, fn)          # first step: agreement and memory
            bank.rows.copy_(start)
            ms = timer(fn) * 1e3
            results[name] = (ms, gpu_ms(fn) if dev.type == "cuda" else float("nan"), peak,
                             losses.double(), grad.double())
        if profile and dev.type == "cuda":
            from torch.profiler import ProfilerActivity, profile
            bank.rows.copy_(start)
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    methods["attention"]()
                for _ in range(5):
                    methods["exact"]()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)
        ex = results["exact"]
        for name, (ms, gms, peak, losses, grad) in results.items():
            rows.append({"n": n, "method": name, "ms": ms, "gpu_ms": gms, "peak_bytes": peak,
                         "dloss": (losses - ex[3]).abs().max().item(), "dgrad": (grad - ex[4]).abs().max().item()})
            print(f"{n:>8} {name:<10} {ms:>8.3f} {ex[0] / ms:>8.2f} {gms:>8.3f} {ex[1] / gms:>8.2f} "
                  f"{peak / MiB:>9.1f} {(losses - ex[3]).abs().max().item():>8.1e} "
                  f"{(grad - ex[4]).abs().max().item():>8.1e}", flush=True)
    print("ms/step: positives + AND loss + backward + bank update (no CNN), wall time of steps run back to back "
          "(host-bound when small); GPU ms: kernel time per step (profiler); x exact = exact / this; "
          "peak = device memory beyond the bank during one step; |dloss|, |dgrad| = max difference from "
          "the exact path on the same first step (released: the plain replicated softmax, mean loss).")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 500_000, 1_281_167])
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--results", default=None, help="JSON-lines file (default: a temp file)")
    ap.add_argument("--device", default=None, help="cpu or cuda: one process on that device, comparing "
                    "the attention fast path, the exact path and the released algorithm")
    ap.add_argument("--released-max", type=int, default=2_000_000, help="largest N to run the released code at")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for --device cpu")
    ap.add_argument("--profile", action="store_true", help="CUDA: print the attention step's top kernels")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--method", choices=("sharded", "replicated"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device:
        single(device=args.device, sizes=args.sizes, steps=args.steps, batch=args.batch, dim=args.dim,
               released_max=args.released_max, threads=args.threads, profile=args.profile)
    else:
        worker(args) if args.worker else parent(args)


if __name__ == "__main__":
    main()
