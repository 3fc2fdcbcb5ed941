"""What the training loop and the probe loop share: epochs of steps that a signal stops at a step
boundary (checkpoint, then the caller exits 128 + N), the epoch's bar, rate and ETA, the
learning-rate schedule, and the training time summed over the segments of a resumed run."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint
from .step_timer import StepTimer


def step_lr(base: float, epoch: int, milestones, gamma: float) -> float:
    """`base` x `gamma` once for every milestone epoch reached."""
    return base * gamma ** sum(epoch >= m for m in milestones)


def cosine_lr(base: float, epoch: int, epochs: int) -> float:
    return 0.5 * base * (1 + math.cos(math.pi * epoch / epochs))


@dataclass
class EpochDone:
    """What the finished part of an epoch measured (this segment's steps only)."""
    loss_sum: torch.Tensor      # sum of the steps' losses, on the device
    steps: int
    seconds: float
    images_per_s: float
    split: dict                 # ms per step waiting for data and computing (step_timer.StepTimer.split)

    def eta(self, steps_per_epoch: int, epochs_left: int) -> float:
        """Seconds for `epochs_left` more epochs at this epoch's pace."""
        return self.seconds / max(self.steps, 1) * steps_per_epoch * epochs_left


class Loop:
    """A loop over epochs of steps. Subclasses set `progress` (epoch, step, global_step, seconds),
    `opt`, `log`, `stop`, `ckpt_root`, `keep`, `batch_size` and `owners` (the checkpointed state),
    and give `interrupted` (fold this segment's partial sums into progress and say where the loop
    stopped)."""

    progress: object
    opt: torch.optim.Optimizer
    owners: dict
    ckpt_root: Path
    keep: int
    batch_size: int

    def start_clock(self) -> None:
        self.clock = (time.time(), self.progress.seconds)

    def tick(self) -> None:
        """progress.seconds = training time over all segments of the run, up to now."""
        start, before = self.clock
        self.progress.seconds = before + time.time() - start

    def set_lr(self, lr: float) -> float:
        for g in self.opt.param_groups:
            g["lr"] = lr
        return lr

    def save(self, name: str, what: str = "checkpoint") -> Path:
        self.tick()
        path = checkpoint.save(self.ckpt_root, name, self.owners, self.keep)
        self.log.info(f"{what} {path}")
        return path

    def run_steps(self, batches, steps: int, desc: str, step_fn, loss_sum: torch.Tensor) -> EpochDone | None:
        """`step_fn(batch)` -> loss tensor (kept on the device) for the rest of this epoch's
        `steps`; None when a signal stopped it, after the checkpoint."""
        p = self.progress
        bar = self.log.bar(steps - p.step, desc)
        t0, start, timer = time.time(), p.step, StepTimer(loss_sum.device)
        try:
            for batch in timer.batches(batches):
                if self.stop is not None and self.stop.requested():
                    name, where, again = self.interrupted(loss_sum)
                    bar.close()
                    self.save(name, self.checkpoint_word)
                    self.log.info(f"{self.label}stopped by signal {self.stop.signum} at {where}: "
                                  f"checkpoint saved; {again}")
                    return None
                loss_sum += step_fn(batch)
                p.step, p.global_step = p.step + 1, p.global_step + 1
                bar.update()
                self.after_step()
        finally:
            bar.close()
        secs, split = time.time() - t0, timer.split()     # the timer syncs once, at the epoch's end
        return EpochDone(loss_sum, p.step - start, secs, (p.step - start) * self.batch_size / max(secs, 1e-9), split)

    label = ""                        # "probes " in the probe loop's lines
    checkpoint_word = "checkpoint"

    def after_step(self) -> None:
        """Per-step work after the counters moved on (the trainer logs a step line)."""

    def interrupted(self, loss_sum: torch.Tensor) -> tuple[str, str, str]:
        """(checkpoint name, where the loop stopped, how to continue)."""
        raise NotImplementedError
