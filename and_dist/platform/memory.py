"""How many rows of a (rows x width) work block fit in the memory that is free right now.

Discovery and kNN search work on blocks of (chunk x bank slice) similarities; at N = 1.28M one
row of such a block is 5 MB in float32, so a fixed chunk either wastes a large GPU or runs a small
one out of memory. `auto_chunk` sizes the chunk from the free device memory (CUDA) or the
available RAM (CPU); `check_chunk` turns an explicit chunk that cannot fit into one clear line.
"""
from __future__ import annotations

import torch

from .errors import UserError

USABLE = 0.6            # share of the free memory a block may take (the allocator fragments, others run)
MAX_AUTO_CHUNK = 8192   # more rows per block gains nothing once the matmul is large


def free_bytes(device: torch.device | str) -> int:
    """Bytes this process could still allocate on `device`: CUDA free memory plus what torch's
    caching allocator holds unused; on CPU, MemAvailable from /proc/meminfo."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def largest_chunk(bytes_per_row: int, fixed: int, device, budget: int | None = None) -> int:
    """Rows that fit in USABLE x (free memory - `fixed` bytes needed besides the block);
    `budget` replaces the measured free memory (tests, or a limit of one's own)."""
    free = free_bytes(device) if budget is None else budget
    return max(0, int((USABLE * free - fixed) // max(bytes_per_row, 1)))


def auto_chunk(bytes_per_row: int, fixed: int, device, rows: int, budget: int | None = None,
               what: str = "chunk") -> int:
    """The chunk for `rows` rows: as many as fit (at most MAX_AUTO_CHUNK, at least 1 row when
    anything fits); a UserError when not even one row fits."""
    fit = largest_chunk(bytes_per_row, fixed, device, budget)
    if fit < 1:
        raise UserError(f"{what}: not even one row of {bytes_per_row / 2**20:.1f} MiB fits in the free "
                        f"memory of {torch.device(device)}; use more ranks so each holds a smaller bank slice")
    return max(1, min(fit, MAX_AUTO_CHUNK, rows))


def resolve_chunk(chunk: int | str | None, bytes_per_row: int, fixed: int, device, rows: int,
                  budget: int | None = None, what: str = "chunk") -> int:
    """`auto`/None/0 -> auto_chunk; an explicit chunk is kept if it fits, else one line saying
    the largest that does."""
    if chunk in (None, 0, "auto"):
        return auto_chunk(bytes_per_row, fixed, device, rows, budget, what)
    chunk = int(chunk)
    need = min(chunk, max(rows, 1))
    fit = largest_chunk(bytes_per_row, fixed, device, budget)
    if need > fit:
        advice = f"use {what}={fit} or {what}=auto" if fit else "use more ranks so each holds a smaller bank slice"
        raise UserError(f"{what}={chunk} needs {(need * bytes_per_row + fixed) / 2**30:.2f} GiB but only "
                        f"{fit} rows fit in the free memory of {torch.device(device)}; {advice}")
    return chunk
