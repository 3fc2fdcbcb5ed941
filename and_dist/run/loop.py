"""What the training loop and the probe loop share: epochs of steps that a signal stops at a step
boundary (checkpoint, then the caller exits 128 + N), the epoch's bar, rate and ETA, the
learning-rate schedule, and the training time summed over the segments of a resumed run."""
from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class StopPoint:
    """Where a signal stopped a loop: the checkpoint saved there, the place in words, how to go on."""
    checkpoint: str
    where: str
    then: str


class Loop(ABC):
    """Epochs of steps that a signal stops at a step boundary (checkpoint first), shared by the
    trainer and the prober. `run_epochs` and `run_steps` are the one place the counters move.

    A subclass holds `progress` (epoch, step, global_step, seconds), `opt`, `log`, `stop` (None:
    never stopped), `ckpt_root`, `keep` and `batch_size`, and gives the hooks below."""

    label = ""                        # "probes " in the probe loop's lines
    checkpoint_word = "checkpoint"

    progress: Any
    opt: torch.optim.Optimizer
    log: Any
    stop: Any
    ckpt_root: Path | None
    keep: int
    batch_size: int

    @abstractmethod
    def train_epoch(self) -> EpochDone | None:
        """Run the rest of the current epoch (`run_steps`); None when a signal stopped it."""

    @abstractmethod
    def step(self, batch) -> torch.Tensor:
        """One optimisation step; returns its loss, kept on the device (no host sync)."""

    @abstractmethod
    def end_of_epoch(self, epoch: int, done: EpochDone) -> None:
        """After `epoch` finished; progress already points at the next one, so a checkpoint
        saved here continues there."""

    @abstractmethod
    def stop_point(self, loss_sum: torch.Tensor) -> StopPoint:
        """Fold this segment's partial loss sum into progress; say where the loop stopped."""

    @abstractmethod
    def checkpoint_owners(self) -> dict:
        """The checkpointed state, by name (checkpoint.save / load)."""

    def after_step(self, loss: torch.Tensor) -> None:
        """Per-step work after the counters moved on (the trainer logs a step line)."""

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
        path = checkpoint.save(self.ckpt_root, name, self.checkpoint_owners(), self.keep)
        self.log.info(f"{what} {path}")
        return path

    def run_epochs(self, epochs: int) -> bool:
        """The epochs left before `epochs`; False when a signal stopped one (after its checkpoint)."""
        progress = self.progress
        while progress.epoch < epochs:
            done = self.train_epoch()
            if done is None:
                return False
            progress.epoch, progress.step = progress.epoch + 1, 0
            self.end_of_epoch(progress.epoch - 1, done)
        return True

    def run_steps(self, batches, steps: int, desc: str, loss_sum: torch.Tensor) -> EpochDone | None:
        """`self.step(batch)` for the rest of this epoch's `steps`, its losses summed on the device;
        None when a signal stopped it, after the checkpoint."""
        progress = self.progress
        bar = self.log.bar(steps - progress.step, desc)
        t0, start, timer = time.time(), progress.step, StepTimer(loss_sum.device)
        try:
            for batch in timer.batches(batches):
                if self.stop is not None and self.stop.requested():
                    at = self.stop_point(loss_sum)
                    bar.close()
                    self.save(at.checkpoint, self.checkpoint_word)
                    self.log.info(f"{self.label}stopped by signal {self.stop.signum} at {at.where}: "
                                  f"checkpoint saved; {at.then}")
                    return None
                loss = self.step(batch)
                loss_sum += loss
                progress.step, progress.global_step = progress.step + 1, progress.global_step + 1
                bar.update()
                self.after_step(loss)
        finally:
            bar.close()
        secs, split = time.time() - t0, timer.split()     # the timer syncs once, at the epoch's end
        done = progress.step - start
        return EpochDone(loss_sum, done, secs, done * self.batch_size / max(secs, 1e-9), split)
