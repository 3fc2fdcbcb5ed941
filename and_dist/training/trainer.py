"""The loop: rounds of epochs of steps, and when to discover, evaluate, checkpoint and stop.

Before round r >= 1, neighbourhood discovery over the memory bank picks the round(N x rate x r)
lowest-entropy samples as anchors; an anchor's positives are itself and its nearest neighbours,
everyone else's only itself. Everything else lives in the components the trainer is handed
(data, model, bank, curriculum, log); it only decides when each is used.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..eval.knn import knn_eval
from ..platform.log import RunLog, fmt
from ..run.loop import Loop, cosine_lr, step_lr
from .report import Report, round_table
from ..method.bank import ShardedBank
from ..method.curriculum import Curriculum
from ..method.discovery import choose, discover
from ..method.attention import select_shard_fn
from ..method.loss import and_loss
from .state import Progress
from ..run.step_timer import describe
from ..run.stop import Stop


@dataclass
class RunParts:
    """The components of a training run, built once by train.build."""
    cfg: object
    env: object
    run_dir: Path
    data: object
    model: torch.nn.Module           # the plain module (state, evaluation)
    forward: torch.nn.Module         # what a step calls: the model under DDP / autocast / compile
    opt: torch.optim.Optimizer
    bank: ShardedBank
    curriculum: Curriculum
    progress: Progress
    log: RunLog
    report: Report
    stop: Stop
    owners: dict                     # the checkpointed state, by name (checkpoint.save/load)


def lr_at(cfg, epoch: int) -> float:
    """The paper's schedule, restarted every round: x gamma at `lr_first_decay`, then every
    `lr_decay_every` epochs; or cosine over the round."""
    t = cfg.train
    if t.schedule == "cosine":
        return cosine_lr(t.lr, epoch, t.epochs_per_round)
    return step_lr(t.lr, epoch, range(t.lr_first_decay, epoch + 1, t.lr_decay_every), t.lr_gamma)


class Trainer(Loop):
    def __init__(self, parts: RunParts):
        self.parts = parts
        self.cfg, self.env, self.run_dir, self.data = parts.cfg, parts.env, parts.run_dir, parts.data
        self.model, self.forward, self.opt, self.bank = parts.model, parts.forward, parts.opt, parts.bank
        self.curriculum, self.progress, self.log = parts.curriculum, parts.progress, parts.log
        self.report, self.stop, self.owners = parts.report, parts.stop, parts.owners
        self.ckpt_root = self.run_dir / "checkpoints" if self.run_dir else None
        self.keep = self.cfg.checkpoint.keep
        self.batch_size = self.cfg.train.batch_size
        self.shard_fn = select_shard_fn(self.cfg.bank.kernel, self.env.device)   # chosen once, not per step
        self.dtype = next(self.model.parameters()).dtype

    def run(self) -> dict | None:
        """Train to the end (returns the summary), or until a stop signal (returns None)."""
        cfg, p = self.cfg, self.progress
        self.start_clock()
        p.segments += 1
        while p.round < cfg.curriculum.rounds:
            if p.round > 0 and p.epoch == 0 and p.step == 0:
                self.discover()
            while p.epoch < cfg.train.epochs_per_round:
                if not self.train_epoch():
                    return None
                p.epoch, p.step = p.epoch + 1, 0
                self.end_of_epoch()
            self.end_of_round()
        return self.finish()

    def discover(self) -> None:
        c, r, t0 = self.cfg, self.progress.round, time.time()
        bar = self.log.bar(self.bank.n, f"round {r} discovery")
        nbhd = discover(self.bank, c.curriculum.neighbours, c.discovery.chunk, c.discovery.backend,
                        c.discovery.precision, progress=bar.update, kernel=c.discovery.kernel)
        bar.close()
        count = self.curriculum.set_round(r, nbhd)
        cons = self.curriculum.consistency(self.data.train.labels)
        self.log.info(f"round {r}: {count} anchors, neighbourhood consistency {fmt(cons, '.4f')} "
                      f"({time.time() - t0:.1f}s)")
        kernel, precision = choose(c.discovery.kernel, c.discovery.precision, c.discovery.backend, self.bank.device)
        self.log.event(event="discovery", round=r, anchors=count, consistency=cons,
                       seconds=time.time() - t0, step=self.progress.global_step, kernel=kernel,
                       precision=precision, loss_kernel=self.shard_fn.__name__)   # what ran this round
        self.report.discovery(r, self.curriculum, self.data, self.progress.global_step)

    def train_epoch(self) -> bool:
        """Run the rest of the current epoch; False if a signal stopped it (after a checkpoint)."""
        cfg, p = self.cfg, self.progress
        self.lr = self.set_lr(lr_at(cfg, p.epoch))
        steps = self.data.steps(p.round, p.epoch)
        self.forward.train()
        zero = torch.zeros((), dtype=torch.float64, device=self.env.device)
        done = self.run_steps(self.data.batches(p.round, p.epoch, p.step), steps,
                              f"round {p.round} epoch {p.epoch}", self.step, zero)
        if done is None:
            return False
        p.epoch_loss += done.loss_sum.item()
        eta = done.eta(steps, cfg.train.epochs_per_round - p.epoch - 1)
        self.log.info(f"round {p.round} epoch {p.epoch}: loss {p.epoch_loss / steps:.4f} lr {self.lr:.4g} "
                      f"{done.images_per_s:.0f} img/s, {describe(done.split)}, round ETA {eta / 60:.1f} min")
        self.log.event(event="epoch", round=p.round, epoch=p.epoch, step=p.global_step, loss=p.epoch_loss / steps,
                       lr=self.lr, seconds=done.seconds, images_per_s=done.images_per_s, **done.split)
        p.epoch_loss = 0.0
        return True

    def interrupted(self, loss_sum: torch.Tensor) -> tuple[str, str, str]:
        p = self.progress
        p.epoch_loss += loss_sum.item()
        return (f"r{p.round}-e{p.epoch}-s{p.step}", f"round {p.round} epoch {p.epoch} step {p.step}",
                "continue with resume=auto")

    def after_step(self) -> None:
        p = self.progress
        if p.global_step % self.cfg.log.every_steps == 0:
            self.log.event(event="step", round=p.round, epoch=p.epoch, step=p.global_step,
                           loss=self.last_loss.item(), lr=self.lr)

    def step(self, batch) -> torch.Tensor:
        """One step; it adds no host sync (the loss stays on the device)."""
        feats = self.forward(batch.images.to(self.dtype))
        positives = self.curriculum.positives(batch.index)
        objective, losses, all_feats = and_loss(feats, positives, self.bank, batch.sizes, self.shard_fn)
        self.opt.zero_grad(set_to_none=True)
        objective.backward()
        self.opt.step()
        self.bank.update(batch.index, all_feats)
        self.last_loss = losses.mean().double()
        return self.last_loss

    def knn(self, train_feats=None) -> tuple[float, float]:
        e = self.cfg.eval
        return knn_eval(self.model, self.data, self.env, e.knn_k, e.knn_sigma, train_feats, self.dtype, self.log.bar)

    def end_of_epoch(self) -> None:
        cfg, p = self.cfg, self.progress
        every = cfg.eval.every_epochs
        if every and (p.epoch % every == 0 or p.epoch == cfg.train.epochs_per_round):
            top1, top5 = self.knn(self.bank.rows)
            p.last_knn = [top1, top5]
            if top1 > p.best.get("knn_top1", -1.0):
                p.best = {"knn_top1": top1, "knn_top5": top5, "round": p.round, "epoch": p.epoch - 1}
            self.log.info(f"round {p.round} epoch {p.epoch - 1}: bank kNN top-1 {top1:.2f} top-5 {top5:.2f}")
            self.log.event(event="knn", round=p.round, epoch=p.epoch - 1, step=p.global_step,
                           knn_top1=top1, knn_top5=top5)
        ck = cfg.checkpoint.every_epochs
        if ck and p.epoch % ck == 0 and p.epoch < cfg.train.epochs_per_round:
            self.save(f"r{p.round}-e{p.epoch}-s0")

    def end_of_round(self) -> None:
        p = self.progress
        top1, top5 = self.knn()
        row = {"round": p.round, "anchors": self.curriculum.anchors(),
               "consistency": self.curriculum.consistency(self.data.train.labels),
               "knn_top1": top1, "knn_top5": top5}
        p.rounds.append(row)
        self.log.event(event="round", step=p.global_step, **row)
        self.log.info(round_table(p.rounds))
        self.report.rounds(p.rounds, p.global_step)
        p.next_round()
        self.save(f"r{p.round - 1}-end")

    def finish(self) -> dict:
        """summary.json; the final kNN is the last round's (train features recomputed with test
        transforms)."""
        self.tick()
        return self.report.summary(self.progress, time.time() - self.clock[0])
