"""The loop: rounds of epochs of steps, and when to discover, evaluate, checkpoint and stop.

Before round r >= 1, neighbourhood discovery over the memory bank picks the round(N x rate x r)
lowest-entropy samples as anchors; an anchor's positives are itself and its nearest neighbours,
everyone else's only itself. Everything else lives in the components the trainer is handed
(data, model, bank, curriculum, log); it only decides when each is used.
"""
from __future__ import annotations

import math
import time

import torch

from . import checkpoint
from .eval.knn import knn_eval
from .log import fmt
from .report import round_table
from .method.discovery import discover
from .method.attention import select_shard_fn
from .method.loss import and_loss
from .step_timer import StepTimer, describe


def lr_at(cfg, epoch: int) -> float:
    """The paper's schedule, restarted every round: x gamma at `lr_first_decay`, then every
    `lr_decay_every` epochs; or cosine over the round."""
    t = cfg.train
    if t.schedule == "cosine":
        return 0.5 * t.lr * (1 + math.cos(math.pi * epoch / t.epochs_per_round))
    decays = 0 if epoch < t.lr_first_decay else 1 + (epoch - t.lr_first_decay) // t.lr_decay_every
    return t.lr * t.lr_gamma ** decays


class Trainer:
    def __init__(self, cfg, env, run, data, model, ddp, opt, bank, curriculum, progress, owners, log,
                 report, stop):
        self.cfg, self.env, self.run_dir, self.data = cfg, env, run, data
        self.model, self.ddp, self.opt, self.bank = model, ddp, opt, bank
        self.curriculum, self.p, self.owners, self.log = curriculum, progress, owners, log
        self.report, self.stop = report, stop
        self.shard_fn = select_shard_fn(cfg.bank.kernel, env.device)   # chosen once, not per step
        self.dtype = next(model.parameters()).dtype

    def run(self) -> dict | None:
        """Train to the end (returns the summary), or until a stop signal (returns None)."""
        cfg, p = self.cfg, self.p
        self.clock = (time.time(), p.seconds)
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

    def tick(self) -> None:
        """Total training seconds over all segments of the run, up to now."""
        start, before = self.clock
        self.p.seconds = before + time.time() - start

    def discover(self) -> None:
        c, r, t0 = self.cfg, self.p.round, time.time()
        bar = self.log.bar(self.bank.n, f"round {r} discovery")
        nbhd = discover(self.bank, c.curriculum.neighbours, c.discovery.chunk, c.discovery.backend,
                        c.discovery.precision, progress=bar.update, kernel=c.discovery.kernel)
        bar.close()
        count = self.curriculum.set_round(r, nbhd)
        cons = self.curriculum.consistency(self.data.train.labels)
        self.log.info(f"round {r}: {count} anchors, neighbourhood consistency {fmt(cons, '.4f')} "
                      f"({time.time() - t0:.1f}s)")
        self.log.event(event="discovery", round=r, anchors=count, consistency=cons,
                       seconds=time.time() - t0, step=self.p.global_step)
        self.report.discovery(r, self.curriculum, self.data, self.p.global_step)

    def train_epoch(self) -> bool:
        """Run the rest of the current epoch; False if a signal stopped it (after a checkpoint)."""
        cfg, p = self.cfg, self.p
        lr = lr_at(cfg, p.epoch)
        for g in self.opt.param_groups:
            g["lr"] = lr
        steps = self.data.steps(p.round, p.epoch)
        self.ddp.train()
        bar = self.log.bar(steps - p.step, f"round {p.round} epoch {p.epoch}")
        t0, start, loss_sum = time.time(), p.step, torch.zeros((), dtype=torch.float64, device=self.env.device)
        timer = StepTimer(self.env.device)
        for batch in timer.batches(self.data.batches(p.round, p.epoch, p.step)):
            if self.stop.requested():
                bar.close()
                p.epoch_loss += loss_sum.item()
                self.save(f"r{p.round}-e{p.epoch}-s{p.step}")
                self.log.info(f"stopped by signal {self.stop.signum} at round {p.round} epoch {p.epoch} "
                              f"step {p.step}: checkpoint saved; continue with resume=auto")
                return False
            loss = self.step(batch)
            loss_sum += loss
            p.step, p.global_step = p.step + 1, p.global_step + 1
            bar.update()
            if p.global_step % cfg.log.every_steps == 0:
                self.log.event(event="step", round=p.round, epoch=p.epoch, step=p.global_step,
                               loss=loss.item(), lr=lr)
        bar.close()
        p.epoch_loss += loss_sum.item()
        split = timer.split()
        secs = time.time() - t0
        rate = (p.step - start) * cfg.train.batch_size / max(secs, 1e-9)
        eta = secs / max(p.step - start, 1) * steps * (cfg.train.epochs_per_round - p.epoch - 1)
        self.log.info(f"round {p.round} epoch {p.epoch}: loss {p.epoch_loss / steps:.4f} lr {lr:.4g} "
                      f"{rate:.0f} img/s, {describe(split)}, round ETA {eta / 60:.1f} min")
        self.log.event(event="epoch", round=p.round, epoch=p.epoch, step=p.global_step,
                       loss=p.epoch_loss / steps, lr=lr, seconds=secs, images_per_s=rate, **split)
        p.epoch_loss = 0.0
        return True

    def step(self, batch) -> torch.Tensor:
        """One step; it adds no host sync (the loss stays on the device)."""
        feats = self.ddp(batch.images.to(self.dtype))
        positives = self.curriculum.positives(batch.index)
        objective, losses, all_feats = and_loss(feats, positives, self.bank, batch.sizes, self.shard_fn)
        self.opt.zero_grad(set_to_none=True)
        objective.backward()
        self.opt.step()
        self.bank.update(batch.index, all_feats)
        return losses.mean().double()

    def knn(self, train_feats=None) -> tuple[float, float]:
        e = self.cfg.eval
        return knn_eval(self.model, self.data, self.env, e.knn_k, e.knn_sigma, train_feats, self.dtype, self.log.bar)

    def end_of_epoch(self) -> None:
        cfg, p = self.cfg, self.p
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
        p = self.p
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

    def save(self, name: str) -> None:
        self.tick()
        path = checkpoint.save(self.run_dir / "checkpoints", name, self.owners, self.cfg.checkpoint.keep)
        self.log.info(f"checkpoint {path}")

    def finish(self) -> dict:
        """summary.json; the final kNN is the last round's (train features recomputed with test
        transforms)."""
        self.tick()
        return self.report.summary(self.p, time.time() - self.clock[0])
