"""Shared by the benchmarks: timing, memory high-water marks and launching torchrun jobs."""
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MiB = 2 ** 20


def measure(fn, steps: int, warmup: int = 3) -> float:
    """Mean seconds per call of `fn` over `steps` calls after `warmup` calls: the one timer of the
    benchmarks, torch.utils.benchmark's Timer (it synchronises the accelerator at both ends; its own
    warm-up of at least 2 calls counts towards `warmup`), at torch's thread count of the caller."""
    import torch
    from torch.utils.benchmark import Timer
    for _ in range(max(0, warmup - max(steps // 100, 2))):
        fn()
    return Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).timeit(steps).mean


def peak_rss() -> int:
    """Peak resident set size of this process in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the high-water mark so set-up temporaries are not counted (Linux only)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, world: int, worker_args: list[str], threads: int, label: str) -> None:
    """Run `script --worker ...` as a fresh W-process gloo job; exit with its output if it fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
           f"--master_port={free_port()}", script, "--worker", *worker_args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        sys.exit(f"worker failed ({label}):\n{proc.stdout}")


# ----------------------------------------------------------------------------- single-device runs

def structured_rows(n: int, dim: int, clusters: int = 1000, seed: int = 0, device="cpu"):
    """A bank shaped like trained features: unit rows around `clusters` centres whose spread varies
    from tight to loose (per-dimension noise 0.01..0.2), so entropies spread from near 0 to near
    log N and anchors, neighbours and the cut-off are like a real round's, unlike random rows."""
    import torch
    import torch.nn.functional as F
    g = torch.Generator(device=device).manual_seed(seed)
    centres = F.normalize(torch.randn(clusters, dim, generator=g, device=device), dim=1)
    order = torch.randperm(clusters, generator=g, device=device)
    spread = 0.01 * torch.logspace(0, 1.3, clusters, device=device)[order]
    rows = torch.empty(n, dim, device=device)
    for a in range(0, n, 1 << 18):
        b = min(n, a + (1 << 18))
        c = torch.randint(0, clusters, (b - a,), generator=g, device=device)
        noise = torch.randn(b - a, dim, generator=g, device=device) * spread[c, None]
        rows[a:b] = F.normalize(centres[c] + noise, dim=1)
    return rows


def device_peak(device, fn):
    """(result, peak bytes allocated during fn beyond what was allocated before); CUDA only, else
    the peak-RSS growth."""
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated(device) - before
    reset_peak_rss()
    before = peak_rss()
    out = fn()
    return out, max(0, peak_rss() - before)
