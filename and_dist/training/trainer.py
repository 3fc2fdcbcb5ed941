"""The loop: rounds of epochs of steps, and when to discover, evaluate, checkpoint and stop.

Before round r >= 1, neighbourhood discovery over the memory bank picks the round(N x rate x r)
lowest-entropy samples as anchors; an anchor's positives are itself and its nearest neighbours,
everyone else's only itself. Everything else lives in the components the trainer is handed
(data, model, bank, curriculum, log); it only decides when each is used.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..config import Config, to_dict
from ..data.base import TrainData
from ..data.sources.images import labelled
from ..eval.knn import knn_eval
from ..method.kernels.attention import select_shard_fn
from ..method.bank import ShardedBank
from ..method.curriculum import Curriculum
from ..method.discovery import discover
from ..method.label_free import measure, view_neighbours, view_sample
from ..method.loss import and_loss
from ..platform.dist import Env
from ..platform.log import RunLog, fmt
from ..run.loop import EpochDone, Loop, StopPoint, cosine_lr, step_lr
from ..run.profile import ProfileWindow
from ..run.step_timer import describe_split
from ..run.stop import Stop
from .report import Report, round_table
from .state import RNG, Progress, RunConfig


def lr_at(cfg, epoch: int) -> float:
    """The paper's schedule, restarted every round: x gamma at `lr_first_decay`, then every
    `lr_decay_every` epochs; or cosine over the round."""
    t = cfg.train
    if t.schedule == "cosine":
        return cosine_lr(t.lr, epoch, t.epochs_per_round)
    return step_lr(t.lr, epoch, range(t.lr_first_decay, epoch + 1, t.lr_decay_every), t.lr_gamma)


class Trainer(Loop):
    """AND's rounds of epochs of steps over the components `train.build_trainer` wires."""
    cfg: Config
    env: Env
    run_dir: Path | None
    data: TrainData
    model: torch.nn.Module           # the plain module (state, evaluation)
    forward: torch.nn.Module         # what a step calls: the model under DDP / autocast / compile
    opt: torch.optim.Optimizer
    bank: ShardedBank
    curriculum: Curriculum
    progress: Progress
    log: RunLog
    report: Report
    stop: Stop | None

    def __init__(self, *, cfg: Config, env: Env, run_dir: Path | None, data: TrainData, model: torch.nn.Module,
                 forward: torch.nn.Module, opt: torch.optim.Optimizer, bank: ShardedBank, curriculum: Curriculum,
                 progress: Progress, log: RunLog, report: Report, stop: Stop | None):
        self.cfg, self.env, self.run_dir, self.data = cfg, env, run_dir, data
        self.model, self.forward, self.opt, self.bank, self.curriculum = model, forward, opt, bank, curriculum
        self.progress, self.log, self.report, self.stop = progress, log, report, stop
        self.ckpt_root = run_dir / "checkpoints" if run_dir else None
        self.keep, self.batch_size = cfg.checkpoint.keep, cfg.train.batch_size
        self.shard_fn = select_shard_fn(cfg.bank.kernel, env.device)   # chosen once, not per step
        self.dtype = next(model.parameters()).dtype
        folder = run_dir / "profile" if run_dir and env.rank == 0 else None
        self.profile = ProfileWindow(cfg.log.profile_steps, folder, env.device, log=log.info if log else print)

    def checkpoint_owners(self) -> dict:
        return {"config": RunConfig(to_dict(self.cfg)), "model": self.model, "optimizer": self.opt,
                "bank": self.bank, "curriculum": self.curriculum, "progress": self.progress, "rng": RNG(),
                "log": self.log}

    def run(self) -> dict | None:
        """Train to the end (returns the summary), or until a stop signal (returns None)."""
        cfg, progress = self.cfg, self.progress
        self.start_clock()
        progress.segments += 1
        while progress.round < cfg.curriculum.rounds:
            if progress.round > 0 and progress.epoch == 0 and progress.step == 0:
                self.start_round()
            if not self.run_epochs(cfg.train.epochs_per_round):
                return None
            self.end_of_round()
        return self.finish()

    def start_round(self) -> None:
        """Neighbourhood discovery over the whole bank, then this round's anchors."""
        c, r, t0 = self.cfg, self.progress.round, time.time()
        bar = self.log.bar(self.bank.n, f"round {r} discovery")
        nbhd = discover(self.bank, c.bank.temperature, k=c.curriculum.neighbours, chunk=c.discovery.chunk,
                        backend=c.discovery.backend, precision=c.discovery.precision, progress=bar.update,
                        kernel=c.discovery.kernel)
        bar.close()
        seconds = time.time() - t0
        previous = self.curriculum.nbhd.neighbours if self.curriculum.nbhd is not None else None
        count = self.curriculum.set_round(r, nbhd)
        cons = self.consistency()
        self.log.info(f"round {r}: {count} anchors, neighbourhood consistency {fmt(cons, '.4f')} "
                      f"({seconds:.1f}s)")
        self.log.event(event="discovery", round=r, anchors=count, consistency=cons,
                       seconds=seconds, step=self.progress.global_step, kernel=nbhd.kernel,
                       precision=nbhd.precision, loss_kernel=self.shard_fn.__name__)   # what ran this round
        free = measure(nbhd.neighbours, previous, self.views if c.discovery.view_sample else None)
        ages = self.bank.ages()
        self.report.discovery(r, self.curriculum, self.data, self.progress.global_step, free, seconds,
                              (ages, self.data.steps(r, 0)))

    def views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the view-agreement sample, the nearest bank row to a fresh view of each)."""
        sample = view_sample(self.bank.n, self.cfg.discovery.view_sample, self.cfg.train.seed)
        return sample, view_neighbours(self.model, self.data, self.bank, sample, self.cfg.train.seed,
                                       self.progress.round, self.dtype)

    def train_epoch(self) -> EpochDone | None:
        cfg, progress = self.cfg, self.progress
        lr = self.set_lr(lr_at(cfg, progress.epoch))
        steps = self.data.steps(progress.round, progress.epoch)
        self.forward.train()
        zero = torch.zeros((), dtype=torch.float64, device=self.env.device)
        done = self.run_steps(self.data.batches(progress.round, progress.epoch, progress.step), steps,
                              f"round {progress.round} epoch {progress.epoch}", zero)
        if done is None:
            return None
        loss = (progress.epoch_loss + done.loss_sum.item()) / steps
        progress.epoch_loss = 0.0
        eta = done.eta(steps, cfg.train.epochs_per_round - progress.epoch - 1)
        self.log.info(f"round {progress.round} epoch {progress.epoch}: loss {loss:.4f} lr {lr:.4g} "
                      f"{done.images_per_s:.0f} img/s, {describe_split(done.split)}, round ETA {eta / 60:.1f} min")
        self.log.event(event="epoch", round=progress.round, epoch=progress.epoch, step=progress.global_step,
                       loss=loss, lr=lr, seconds=done.seconds, images_per_s=done.images_per_s, **done.split)
        return done

    def stop_point(self, loss_sum: torch.Tensor) -> StopPoint:
        p = self.progress
        p.epoch_loss += loss_sum.item()
        return StopPoint(f"r{p.round}-e{p.epoch}-s{p.step}", f"round {p.round} epoch {p.epoch} step {p.step}",
                         "continue with resume=auto")

    def after_step(self, loss: torch.Tensor) -> None:
        self.profile.step()
        p = self.progress
        if p.global_step % self.cfg.log.every_steps == 0:
            self.log.event(event="step", round=p.round, epoch=p.epoch, step=p.global_step,
                           loss=loss.item(), lr=self.opt.param_groups[0]["lr"])

    def step(self, batch) -> torch.Tensor:
        """One step: the loss against the bank as it was, the update, then the bank moves towards
        this step's features. It adds no host sync (the loss stays on the device)."""
        feats = self.forward(batch.images.to(self.dtype))
        positives = self.curriculum.positives(batch.index)
        objective, losses, all_feats = and_loss(feats, positives, self.bank, batch.sizes, self.cfg.bank.temperature,
                                                self.shard_fn)
        self.opt.zero_grad(set_to_none=True)
        objective.backward()
        self.opt.step()
        self.bank.update(batch.index, all_feats)
        return losses.mean().double()

    def consistency(self) -> float | None:
        """The anchors' neighbourhood consistency; None without labels."""
        return self.curriculum.consistency(self.data.train.labels) if labelled(self.data) else None

    def knn(self, train_feats=None) -> tuple[float | None, float | None]:
        """kNN top-1/top-5 (%); (None, None) without labels (train.build_trainer said so once)."""
        if not labelled(self.data):
            return None, None
        e = self.cfg.eval
        return knn_eval(self.model, self.data, self.env, e.knn_k, e.knn_sigma, train_feats, self.dtype, self.log.bar)

    def end_of_epoch(self, epoch: int, done: EpochDone) -> None:
        cfg, p = self.cfg, self.progress
        finished, every = epoch + 1, cfg.eval.every_epochs
        if every and labelled(self.data) and (finished % every == 0 or finished == cfg.train.epochs_per_round):
            top1, top5 = self.knn(self.bank.rows)
            p.last_knn = [top1, top5]
            if top1 > p.best.get("knn_top1", -1.0):
                p.best = {"knn_top1": top1, "knn_top5": top5, "round": p.round, "epoch": epoch}
            self.log.info(f"round {p.round} epoch {epoch}: bank kNN top-1 {top1:.2f} top-5 {top5:.2f}")
            self.log.event(event="knn", round=p.round, epoch=epoch, step=p.global_step,
                           knn_top1=top1, knn_top5=top5)
        ck = cfg.checkpoint.every_epochs
        if ck and finished % ck == 0 and finished < cfg.train.epochs_per_round:
            self.save(f"r{p.round}-e{finished}-s0")

    def end_of_round(self) -> None:
        p = self.progress
        top1, top5 = self.knn()
        row = {"round": p.round, "anchors": self.curriculum.anchors(),
               "consistency": self.consistency(),
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
        self.profile.close()
        self.tick()
        return self.report.summary(self.progress, time.time() - self.clock[0])
