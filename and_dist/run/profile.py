"""A window of traced steps (log.profile_steps): where a step's time goes, op by op.

Why: the step timer splits data wait from compute, but says nothing about which kernels or host
gaps make up the compute. After a warm-up (compiles, cuDNN's autotuning, the allocator's growth),
N steps are traced with torch.profiler into <folder>: trace.json (open it in ui.perfetto.dev or
chrome://tracing), summary.txt (the top ops by self time; on CUDA the GPU's idle share of the
window) and, on CUDA, memory.pickle (a snapshot of the allocator's history: pytorch.org/memory_viz).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

WARMUP = 5          # steps before the window opens


def busy_seconds(intervals) -> float:
    """Seconds covered by the union of (start, end) intervals (kernels on several streams overlap)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


class ProfileWindow:
    """Call step() after every step; the window opens after `warmup` steps and closes `steps` later
    (close() ends a window the run outlived). steps=0 or folder=None: does nothing."""

    def __init__(self, steps: int, folder: Path | None, device: torch.device, warmup: int = WARMUP, log=print):
        self.steps, self.folder, self.device, self.warmup, self.log = steps, folder, device, warmup, log
        self.cuda = device.type == "cuda"
        self.seen, self.prof, self.done = 0, None, not steps or folder is None

    def step(self) -> None:
        if self.done:
            return
        self.seen += 1
        if self.seen == self.warmup:
            self._open()
        elif self.seen == self.warmup + self.steps:
            self.close()

    def _open(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=100_000)
            torch.cuda.synchronize(self.device)
        self.prof = torch.profiler.profile(activities=activities, acc_events=True)   # one cycle: no 2.11 warning
        self.prof.__enter__()
        self.t0 = time.perf_counter()

    def close(self) -> None:
        """End the window and write its files (a window not yet open is dropped)."""
        if self.done:
            return
        self.done = True
        if self.prof is None:
            return
        if self.cuda:
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        self.folder.mkdir(parents=True, exist_ok=True)
        traced = self.seen - self.warmup
        self.prof.export_chrome_trace(str(self.folder / "trace.json"))
        if self.cuda:
            torch.cuda.memory._dump_snapshot(str(self.folder / "memory.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        (self.folder / "summary.txt").write_text(self.summary(traced, wall))
        self.log(f"profile of {traced} steps written to {self.folder} (trace.json, summary.txt"
                 + (", memory.pickle)" if self.cuda else ")"))

    def summary(self, traced: int, wall: float) -> str:
        lines = [f"{traced} steps traced after {self.warmup} of warm-up on {self.device}: "
                 f"{1e3 * wall / max(traced, 1):.2f} ms/step"]
        if self.cuda:
            kernels = [(e.time_range.start, e.time_range.end) for e in self.prof.events()
                       if e.device_type == torch.autograd.DeviceType.CUDA]
            busy = busy_seconds(kernels) / 1e6
            lines.append(f"GPU busy {100 * busy / wall:.0f}% of the window, idle {100 * (1 - busy / wall):.0f}% "
                         f"({len(kernels)} kernels and copies)")
        sort = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        lines += ["", "top ops by self time:", self.prof.key_averages().table(sort_by=sort, row_limit=15)]
        return "\n".join(lines) + "\n"
