"""Train AND: `python -m and_dist.train --config demo [key=value ...]`, or under torchrun.

Rounds 0..R-1 of E epochs each. Before round r >= 1, neighbourhood discovery over the memory bank
picks the round(N x rate x r) lowest-entropy samples as anchors; an anchor's positives are itself
and its nearest neighbours, everyone else's only itself.

Everything random in a step (sample order, augmentation) is drawn from seeds derived from
(seed, round, epoch, step) for the whole global batch, so a run does not depend on the number of
ranks and resumes mid-epoch on the same trajectory.
"""
from __future__ import annotations

import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from . import checkpoint, dist
from .augment import TestTransform, TrainAugment
from .bank import ShardedBank, and_loss, positive_sets
from .config import Config, config_or_exit, run_dir, save_config, to_dict
from .data import ImageSet, load_datasets
from .discovery import Neighbourhood, anchor_count, consistency, discover, select_anchors
from .knn import knn_accuracy
from .log import RunLog
from .models import build_model
from .syncbn import convert_global_bn


def _seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (Python's hash of ints is not salted, but be explicit)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def lr_at(cfg: Config, epoch: int) -> float:
    """The paper's schedule, restarted every round: x gamma at `lr_first_decay`, then every
    `lr_decay_every` epochs; or cosine over the round."""
    t = cfg.train
    if t.schedule == "cosine":
        return 0.5 * t.lr * (1 + math.cos(math.pi * epoch / t.epochs_per_round))
    decays = 0 if epoch < t.lr_first_decay else 1 + (epoch - t.lr_first_decay) // t.lr_decay_every
    return t.lr * t.lr_gamma ** decays


def global_batches(n: int, batch: int, world: int, seed: int, round_: int, epoch: int) -> list[torch.Tensor]:
    """The epoch's global batches of sample indices; a last batch too small to give every rank a
    sample is dropped."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(seed, round_, epoch)))
    batches = list(order.split(batch))
    if len(batches[-1]) < world:
        batches.pop()
    return batches


def rank_sizes(total: int, world: int) -> list[int]:
    return [hi - lo for lo, hi in (dist.shard_range(total, world, r) for r in range(world))]


@dataclass
class Position:
    """Where the run is: the next step to run."""
    round: int = 0
    epoch: int = 0
    step: int = 0
    global_step: int = 0
    epoch_loss: float = 0.0   # running sum over this epoch's finished steps, for its mean


class Trainer:
    def __init__(self, cfg: Config, env: dist.Env):
        self.cfg, self.env = cfg, env
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        if t.deterministic:
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(t.seed)
        self.dir = run_dir(cfg)
        if env.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.dir / "config.yaml")
        dist.barrier()
        self.log = RunLog(self.dir, env.is_main, cfg.log.progress, cfg.log.wandb_mode,
                          cfg.log.wandb_project, cfg.log.wandb_entity, to_dict(cfg), cfg.name)
        self.train_set, self.test_set = self._load_data()
        self.n = len(self.train_set.labels)
        self.num_classes = len(self.train_set.classes)

        model = build_model(cfg.model.arch, cfg.model.low_dim)
        if cfg.model.sync_bn and env.world > 1:
            model = convert_global_bn(model)
        self.dtype = getattr(torch, t.dtype)
        self.model = model.to(env.device, self.dtype)
        self.ddp = self.model
        if env.world > 1:
            ids = [env.device] if env.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=t.lr, momentum=t.momentum,
                                   nesterov=t.nesterov, weight_decay=t.weight_decay)
        self.bank = ShardedBank(self.n, cfg.model.low_dim, cfg.bank.temperature, cfg.bank.momentum,
                                seed=t.seed, device=env.device, dtype=self.dtype)
        mean, std = channel_stats(self.train_set.images)
        d = cfg.data
        self.augment = TrainAugment(d.image_size, tuple(d.crop_scale), d.jitter, d.grayscale_p, d.flip, mean, std)
        self.test_transform = TestTransform(d.image_size, mean, std)

        self.pos = Position()
        self.nbhd: Neighbourhood | None = None
        self.anchor: torch.Tensor | None = None
        self.rounds: list[dict] = []        # the per-round table
        self.best = {"knn_top1": -1.0}
        self.last_knn: tuple[float, float] | None = None
        self.stop_signal: int | None = None
        self._resume()

    # ----------------------------------------------------------------------------- set-up
    def _load_data(self) -> tuple[ImageSet, ImageSet]:
        d = self.cfg.data
        cache = d.cache_dir or str(self.dir.parent / ".cache")
        kwargs = dict(source=d.source, root=d.root, image_size=d.image_size, cache_dir=cache,
                      download=d.download, workers=d.workers, demo_train=d.demo_train,
                      demo_test=d.demo_test, demo_seed=d.demo_seed, log=self.log.info,
                      progress=self.log.progress)
        if self.env.is_main:  # rank 0 decodes and fills the cache first; the others read it
            sets = load_datasets(**kwargs)
        dist.barrier()
        if not self.env.is_main:
            sets = load_datasets(**{**kwargs, "log": lambda *_: None, "progress": False})
        return sets

    def _resume(self) -> None:
        r = self.cfg.resume
        if not r:
            self._start_fresh()
            return
        path = checkpoint.find_latest(self.dir / "checkpoints") if r == "auto" else Path(r).expanduser()
        if path is None:
            self.log.info(f"resume=auto: no checkpoint in {self.dir / 'checkpoints'}, starting fresh")
            return
        if not (path / "state.pt").exists():
            raise FileNotFoundError(f"resume: {path} is not a checkpoint directory (no state.pt)")
        s = checkpoint.load(path, self.bank)
        self.model.load_state_dict(s["model"])
        self.opt.load_state_dict(s["optimizer"])
        self.pos = Position(**s["position"])
        if s["entropy"] is not None:
            self.nbhd = Neighbourhood(s["entropy"], s["neighbours"])
            self.anchor = s["anchor"]
        self.rounds, self.best = s["rounds"], s["best"]
        self.last_knn = tuple(s["last_knn"]) if s["last_knn"] is not None else None
        torch.set_rng_state(s["rng_cpu"])
        if s["rng_cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(s["rng_cuda"])
        if self.env.is_main:
            self.log.truncate_metrics(s["metrics_lines"])
        self.log.info(f"resumed from {path} at round {self.pos.round} epoch {self.pos.epoch} step {self.pos.step}")

    def _start_fresh(self) -> None:
        """A fresh run in an existing run directory replaces its metrics, summary and `latest`
        pointer, so nothing mixes two runs (old checkpoint directories are pruned as usual)."""
        if not self.env.is_main:
            return
        stale = [self.dir / "metrics.jsonl", self.dir / "summary.json", self.dir / "checkpoints" / checkpoint.LATEST]
        if any(p.exists() for p in stale):
            self.log.info(f"{self.dir} holds an earlier run: starting afresh (resume=auto would continue it)")
            for p in stale:
                p.unlink(missing_ok=True)

    def _save(self, name: str) -> None:
        p = self.pos
        state = {
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
            "position": vars(p).copy(),
            "entropy": self.nbhd.entropy if self.nbhd else None,
            "neighbours": self.nbhd.neighbours if self.nbhd else None,
            "anchor": self.anchor, "rounds": self.rounds, "best": self.best,
            "last_knn": list(self.last_knn) if self.last_knn else None,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "config": to_dict(self.cfg),
            "metrics_lines": self.log.metrics_lines(),
        }
        path = checkpoint.save(self.dir / "checkpoints", name, state, self.bank, self.cfg.checkpoint.keep)
        self.log.info(f"checkpoint {path}")

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum

    # ----------------------------------------------------------------------------- the loop
    def run(self) -> dict | None:
        """Train to the end (returns the summary), or until a signal stops it (returns None)."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._run()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.log.close()

    def _run(self) -> dict | None:
        cfg, t0 = self.cfg, time.time()
        while self.pos.round < cfg.curriculum.rounds:
            if self.pos.round > 0 and self.pos.epoch == 0 and self.pos.step == 0:
                self._discover()
            while self.pos.epoch < cfg.train.epochs_per_round:
                if not self._train_epoch():
                    return None
                self.pos.epoch += 1
                self.pos.step = 0
                self._end_of_epoch()
            self._end_of_round()
        return self._final(time.time() - t0)

    def _discover(self) -> None:
        c, r = self.cfg, self.pos.round
        t0 = time.time()
        bar = self.log.bar(self.bank.n, f"round {r} discovery")
        self.nbhd = discover(self.bank, c.curriculum.neighbours, c.discovery.chunk, c.discovery.backend,
                             c.discovery.precision, progress=bar.update)
        bar.close()
        count = anchor_count(r, self.n, c.curriculum.anchor_rate)
        self.anchor = select_anchors(self.nbhd.entropy, count)
        cons = consistency(self.anchor, self.nbhd.neighbours, self.train_set.labels)
        self.log.info(f"round {r}: {count} anchors, neighbourhood consistency {cons:.4f} "
                      f"({time.time() - t0:.1f}s)")
        self.log.event(event="discovery", round=r, anchors=count, consistency=cons,
                       seconds=time.time() - t0, step=self.pos.global_step)

    def _train_epoch(self) -> bool:
        """Run the rest of the current epoch; False if a signal stopped it (after a checkpoint)."""
        cfg, env, p = self.cfg, self.env, self.pos
        lr = lr_at(cfg, p.epoch)
        for g in self.opt.param_groups:
            g["lr"] = lr
        batches = global_batches(self.n, cfg.train.batch_size, env.world, cfg.train.seed, p.round, p.epoch)
        self.ddp.train()
        bar = self.log.bar(len(batches) - p.step, f"round {p.round} epoch {p.epoch}")
        t0 = time.time()
        while p.step < len(batches):
            if self._stop_requested():
                bar.close()
                self._save(f"r{p.round}-e{p.epoch}-s{p.step}")
                self.log.info(f"stopped by signal {self.stop_signal}: checkpoint saved; "
                              f"continue with resume=auto")
                return False
            loss = self._step(batches[p.step], lr)
            p.epoch_loss += loss
            p.step += 1
            p.global_step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}")
        bar.close()
        self.log.event(event="epoch", round=p.round, epoch=p.epoch, step=p.global_step,
                       loss=p.epoch_loss / len(batches), lr=lr, seconds=time.time() - t0)
        p.epoch_loss = 0.0
        return True

    def _stop_requested(self) -> bool:
        flag = torch.tensor([1.0 if self.stop_signal is not None else 0.0], device=self.env.device)
        return dist.all_reduce(flag, "max").item() > 0

    def _step(self, idx: torch.Tensor, lr: float) -> float:
        env, p = self.env, self.pos
        sizes = rank_sizes(len(idx), env.world)
        offset = sum(sizes[: env.rank])
        mine = idx[offset: offset + sizes[env.rank]]
        gen = torch.Generator().manual_seed(_seed(self.cfg.train.seed, p.round, p.epoch, p.step, 1))
        x = self.augment(self.train_set.images[mine].to(env.device, non_blocking=True), gen,
                         offset=offset, total=len(idx)).to(self.dtype)
        feats = self.ddp(x)
        positives = positive_sets(idx, self.anchor, self.nbhd.neighbours if self.nbhd else None)
        objective, losses, all_feats = and_loss(feats, positives.to(env.device), self.bank, sizes)
        self.opt.zero_grad(set_to_none=True)
        objective.backward()
        self.opt.step()
        self.bank.update(idx.to(env.device), all_feats)
        loss = losses.mean().item()
        self.log.event(event="step", round=p.round, epoch=p.epoch, step=p.global_step, loss=loss, lr=lr)
        return loss

    def _end_of_epoch(self) -> None:
        cfg, p = self.cfg, self.pos
        every = cfg.eval.every_epochs
        if every and (p.epoch % every == 0 or p.epoch == cfg.train.epochs_per_round):
            lo, hi = self.bank.lo, self.bank.hi
            top1, top5 = self._knn(self.bank.rows, self.train_set.labels[lo:hi], "bank kNN")
            self.last_knn = (top1, top5)
            if top1 > self.best["knn_top1"]:
                self.best = {"knn_top1": top1, "knn_top5": top5, "round": p.round, "epoch": p.epoch - 1}
            self.log.info(f"round {p.round} epoch {p.epoch - 1}: kNN top-1 {top1:.2f} top-5 {top5:.2f}")
            self.log.event(event="knn", round=p.round, epoch=p.epoch - 1, step=p.global_step,
                           knn_top1=top1, knn_top5=top5)
        ck = cfg.checkpoint.every_epochs
        if ck and p.epoch % ck == 0 and p.epoch < cfg.train.epochs_per_round:
            self._save(f"r{p.round}-e{p.epoch}-s0")

    def _end_of_round(self) -> None:
        p = self.pos
        top1, top5 = self._recomputed_knn()
        row = {"round": p.round,
               "anchors": int(self.anchor.sum()) if self.anchor is not None else 0,
               "consistency": (consistency(self.anchor, self.nbhd.neighbours, self.train_set.labels)
                               if self.anchor is not None else float("nan")),
               "knn_top1": top1, "knn_top5": top5}
        self.rounds.append(row)
        self.log.event(event="round", step=p.global_step, **row)
        self.log.info(_table(self.rounds))
        self.pos = Position(p.round + 1, 0, 0, p.global_step)
        self._save(f"r{p.round}-end")

    def _final(self, seconds: float) -> dict:
        """summary.json; the final kNN is the last round's (train features recomputed with test
        transforms)."""
        summary = {"rounds": self.rounds, "best_bank_knn": self.best,
                   "best_note": "best is picked on the test set; report final_knn as the result",
                   "last_bank_knn_top1": self.last_knn[0] if self.last_knn else None,
                   "seconds": seconds}
        if self.rounds:
            top1, top5 = self.rounds[-1]["knn_top1"], self.rounds[-1]["knn_top5"]
            summary.update(final_knn_top1=top1, final_knn_top5=top5)
            self.log.info(f"final kNN (train features, test transforms): top-1 {top1:.2f} top-5 {top5:.2f}; "
                          f"best per-epoch bank kNN top-1 {self.best['knn_top1']:.2f} (picked on the test set)")
            self.log.event(event="final", step=self.pos.global_step, knn_top1=top1, knn_top5=top5)
        if self.env.is_main:
            (self.dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    # ----------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def _features(self, images: torch.Tensor, lo: int, hi: int, desc: str, batch: int = 512) -> torch.Tensor:
        self.model.eval()
        out = []
        bar = self.log.bar(hi - lo, desc)
        for a in range(lo, hi, batch):
            x = self.test_transform(images[a: min(a + batch, hi)].to(self.env.device)).to(self.dtype)
            out.append(self.model(x))
            bar.update(len(x))
        bar.close()
        self.model.train()
        return torch.cat(out) if out else torch.empty(0, self.cfg.model.low_dim, device=self.env.device)

    def _recomputed_knn(self) -> tuple[float, float]:
        """kNN against train features recomputed with test transforms (this rank's slice)."""
        lo, hi = self.bank.lo, self.bank.hi
        train_feats = self._features(self.train_set.images, lo, hi, "train features")
        return self._knn(train_feats, self.train_set.labels[lo:hi], "kNN")

    def _knn(self, train_feats: torch.Tensor, train_labels: torch.Tensor, desc: str) -> tuple[float, float]:
        """Test features are computed shard by shard and shared; train features stay sharded."""
        n_test = len(self.test_set.labels)
        lo, hi = dist.shard_range(n_test, self.env.world, self.env.rank)
        test = self._features(self.test_set.images, lo, hi, "test features")
        test = dist.all_gather_rows(test, rank_sizes(n_test, self.env.world))
        bar = self.log.bar(n_test, desc)
        acc = knn_accuracy(test, self.test_set.labels, train_feats, train_labels, self.num_classes,
                           self.cfg.eval.knn_k, self.cfg.eval.knn_sigma, progress=bar.update)
        bar.close()
        return acc


def channel_stats(images: torch.Tensor, limit: int = 10000) -> tuple[tuple, tuple]:
    """Per-channel mean/std of the train images (a strided sample), for normalisation."""
    sample = images[:: max(1, len(images) // limit)].float().div_(255)
    return tuple(sample.mean((0, 1, 2)).tolist()), tuple(sample.std((0, 1, 2)).tolist())


def _table(rows: list[dict]) -> str:
    lines = ["round  anchors  consistency  kNN top-1"]
    for r in rows:
        cons = "-" if math.isnan(r["consistency"]) else f"{r['consistency']:.4f}"
        lines.append(f"{r['round']:>5}  {r['anchors']:>7}  {cons:>11}  {r['knn_top1']:>9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cfg = config_or_exit(argv)
    env = dist.init(cfg.train.device)
    try:
        trainer = Trainer(cfg, env)
        trainer.run()
        del trainer  # DDP must go before its process group, or gloo aborts at exit
    except Exception as e:
        print(f"[rank {env.rank}] error: {type(e).__name__}: {e}", file=sys.stderr)
        raise
    finally:
        dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
