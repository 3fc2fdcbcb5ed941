"""Training and scoring the linear probes of a frozen model (the `Prober` loop). `run_probes` is the
one way in: `evaluate probe` calls it (and probe.py, which is `evaluate probe` kept in the run), and
training calls it when `probe.after_train` is set."""
from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..run import checkpoint
from ..run.contents import RunState
from ..platform import dist, files
from ..config import Config
from ..data import build_data
from ..data.sources.images import NO_LABELS, labelled
from ..platform.errors import UserError
from ..platform.log import RunLog, fmt
from ..run.loop import EpochDone, Loop, StopPoint, step_lr
from ..run.stop import Stop
from .probes import ProbeHeads, ProbeProgress, Taps, score_heads


# probe settings that must not change between a probe checkpoint and the run continuing it
FIXED = ("layers", "batch_size", "lr", "momentum", "weight_decay", "lr_decay_epochs", "lr_gamma",
         "crop_scale", "batch_norm")


def probe_data_config(cfg: Config) -> Config:
    """The run's data with the probe's augmentation and batch."""
    c = copy.deepcopy(cfg)
    c.data.jitter, c.data.grayscale_p, c.data.flip = 0.0, 0.0, True
    c.data.crop_scale = list(cfg.probe.crop_scale)
    c.train.batch_size = cfg.probe.batch_size
    return c


def run_probes(cfg: Config, env, run_dir: Path, model: nn.Module, log: RunLog, stop: Stop | None = None,
               step: int = 0, out_dir: Path | None = None, knn: tuple | None = None) -> dict | None:
    """Train and score the probes of `model` (frozen, put in eval mode) for `cfg.probe`; outputs and
    probe checkpoints in `out_dir` (default `run_dir`). `step`: the pretraining step of the probed
    weights (wandb steps continue from it). `knn`: (top-1, top-5) shown beside the probes, by
    default the run's final kNN. Returns the probes.json content, or None when `stop` was
    signalled (after a checkpoint)."""
    was_training, prober = model.training, None
    try:
        prober = Prober(cfg, env, Path(run_dir), model, log, stop, step, out_dir, knn)
        return prober.run()
    finally:
        if prober is not None:
            prober.taps.close()
        model.train(was_training)


def check_layers(cfg: Config, model: nn.Module) -> None:
    """Fail on a bad `probe.layers` before pretraining, not after it (one dry forward, eval mode)."""
    was_training = model.training
    model.eval()
    try:
        Taps(model, cfg.probe.layers, cfg.data.image_size).close()
    finally:
        model.train(was_training)


def final_knn(run_dir: Path) -> tuple[float | None, float | None]:
    """The pretraining's final kNN (top-1, top-5) from its summary.json, shown beside the probes."""
    try:
        s = json.loads((run_dir / "summary.json").read_text())
        return s.get("final_knn_top1"), s.get("final_knn_top5")
    except (OSError, ValueError):
        return None, None


class Prober(Loop):
    label, checkpoint_word = "probes ", "probe checkpoint"

    def __init__(self, cfg, env, run_dir, model, log, stop, step, out_dir=None, knn=None):
        self.cfg, self.protocol, self.env, self.log, self.stop = cfg, cfg.probe, env, log, stop
        self.out, self.knn = Path(out_dir or run_dir), knn or final_knn(run_dir)
        self.base_step, self.ckpt_root, self.keep = step, self.out / "probes" / "checkpoints", 2
        self.batch_size = self.protocol.batch_size
        model.eval()
        self.taps = Taps(model, self.protocol.layers, cfg.data.image_size)
        self.data = build_data(probe_data_config(cfg), env, None, log.info, log.tty)
        if not labelled(self.data):
            raise UserError(NO_LABELS.format(source=cfg.data.source, what="a linear probe"))
        torch.manual_seed(cfg.train.seed)
        self.heads = ProbeHeads(list(self.taps.dims.values()), len(self.data.train.classes),
                                self.protocol.batch_norm).to(env.device)
        self.forward = dist.data_parallel(self.heads, env)
        self.opt = torch.optim.SGD(self.heads.parameters(), lr=self.protocol.lr, momentum=self.protocol.momentum,
                                   weight_decay=self.protocol.weight_decay)
        self.progress = ProbeProgress(loss=[0.0] * len(self.protocol.layers), source={
            "pretrain_step": step, "arch": cfg.model.arch, **{k: getattr(self.protocol, k) for k in FIXED}})
        self.autocast = env.device.type == "cuda" and cfg.train.precision != "fp32"
        self.dtype = next(model.parameters()).dtype
        self._restore()

    def _restore(self) -> None:
        ckpt = checkpoint.find_latest(self.ckpt_root)
        if ckpt is None:
            self.log.info(f"probes: fresh start; layers {', '.join(f'{n} ({d})' for n, d in self.taps.dims.items())}")
            return
        saved = RunState(ckpt)
        have = saved.progress["source"]
        for key, value in self.progress.source.items():      # before any owner takes a state
            if have.get(key) != value:
                raise UserError(f"{ckpt} holds probes with {key}={have.get(key)!r}, this run asks for "
                                f"{value!r}; use the same setting or remove {self.out / 'probes'} to probe again")
        saved.restore(self.checkpoint_owners())             # "log" is missing in older ones: it stays fresh
        p = self.progress
        self.log.info(f"probes: resuming {ckpt} at epoch {p.epoch} step {p.step}")

    # ------------------------------------------------------------------ the loop

    def lr_at(self, epoch: int) -> float:
        return step_lr(self.protocol.lr, epoch, self.protocol.lr_decay_epochs, self.protocol.lr_gamma)

    def checkpoint_owners(self) -> dict:
        return {"heads": self.heads, "optimizer": self.opt, "progress": self.progress, "log": self.log}

    def run(self) -> dict | None:
        self.start_clock()
        return self.finish() if self.run_epochs(self.protocol.epochs) else None

    def train_epoch(self) -> EpochDone | None:
        p = self.progress
        self.set_lr(self.lr_at(p.epoch))
        self.forward.train()
        zero = torch.zeros(len(self.taps.layers), dtype=torch.float64, device=self.env.device)
        return self.run_steps(self.data.batches(0, p.epoch, p.step), self.data.steps(0, p.epoch),
                              f"probe epoch {p.epoch}", zero)

    def step(self, batch) -> torch.Tensor:
        feats = self.taps(batch.images.to(self.dtype), self.autocast)
        labels = batch.labels.to(self.env.device)
        losses = [F.cross_entropy(logits, labels) for logits in self.forward(feats)]
        self.opt.zero_grad(set_to_none=True)
        torch.stack(losses).sum().backward()
        self.opt.step()
        return torch.stack([l.detach() for l in losses]).double()

    def stop_point(self, loss_sum: torch.Tensor) -> StopPoint:
        # every rank's partial sum, saved as a per-rank share: the epoch's closing
        # all-reduce adds each rank's new sum to it once per rank
        p = self.progress
        partial = dist.all_reduce(loss_sum.clone()).cpu() / self.env.world
        p.loss = (torch.tensor(p.loss, dtype=torch.float64) + partial).tolist()
        return StopPoint(f"e{p.epoch}-s{p.step}", f"epoch {p.epoch} step {p.step}",
                         "run the same command again to continue")

    def end_of_epoch(self, epoch: int, done: EpochDone) -> None:
        p, layers, env = self.progress, self.taps.layers, self.env
        total = dist.all_reduce(done.loss_sum + torch.tensor(p.loss, dtype=torch.float64, device=env.device)).cpu()
        epoch_loss = (total / max(self.data.steps(0, epoch) * env.world, 1)).tolist()
        p.loss = [0.0] * len(p.loss)
        ten = self.protocol.ten_crop and epoch + 1 == self.protocol.epochs
        bar = self.log.bar(len(self.data.test) // env.world, "probe test")
        scores = score_heads(self.heads, self.taps, self.data, env, ten, self.autocast, bar)
        bar.close()
        lr = self.lr_at(epoch)
        row = {"epoch": epoch, "lr": lr, "crop": "ten" if ten else "centre",
               "layers": {n: {"top1": t1, "top5": t5, "loss": loss}
                          for n, (t1, t5), loss in zip(layers, scores, epoch_loss)}}
        p.history.append(row)
        self.log.info(f"probe epoch {epoch}: lr {lr:.4g} {done.images_per_s:.0f} img/s; top-1 "
                      + " ".join(f"{n} {fmt(s[0])}" for n, s in zip(layers, scores)))
        step = self.base_step + p.global_step
        self.log.event(event="probe", epoch=epoch, step=step, lr=lr, images_per_s=done.images_per_s,
                       **{f"{n}_{k}": v for n, r in row["layers"].items() for k, v in r.items()})
        self.write_outputs(finished=False, image_step=step)
        self.save(f"e{p.epoch}", self.checkpoint_word)

    def finish(self) -> dict:
        results = self.write_outputs(finished=True)
        self.log.info("probes done: " + ", ".join(f"{n} top-1 {fmt(r['top1'])} top-5 {fmt(r['top5'])}"
                                                  for n, r in results["layers"].items())
                      + f"; kNN top-1 {fmt(results['knn_top1'])}  ({self.out / 'probes.json'})")
        return results

    # ------------------------------------------------------------------ outputs

    def write_outputs(self, finished: bool, image_step: int | None = None) -> dict:
        """probes.json and probes.png (rank 0) from the last scored epoch; the chart also to wandb."""
        p, cfg = self.progress, self.cfg
        last = p.history[-1]["layers"] if p.history else {}
        knn1, knn5 = self.knn
        results = {
            "finished": finished, "epochs_done": p.epoch, "pretrain_step": self.base_step,
            "arch": cfg.model.arch, "image_size": cfg.data.image_size, "classes": len(self.data.train.classes),
            "crop": p.history[-1]["crop"] if p.history else None,
            "layers": {t.name: {"top1": last.get(t.name, {}).get("top1"), "top5": last.get(t.name, {}).get("top5"),
                                "dim": t.dim, "shape": list(t.shape), "pool": repr(t.pool)} for t in self.taps.taps},
            "knn_top1": knn1, "knn_top5": knn5,
            "note": "top-1/top-5 (%) of the last epoch on the test split, never the best over epochs",
            "protocol": asdict(self.protocol), "history": p.history, "seconds": p.seconds,
        }
        if self.env.is_main and last:
            from ..platform.plots import probe_chart
            files.write_text(self.out / "probes.json", json.dumps(results, indent=2))
            title = f"{cfg.name}: linear probes ({cfg.model.arch}, epoch {p.epoch}/{self.protocol.epochs})"
            chart = probe_chart(self.out / "probes.png", {n: r["top1"] for n, r in last.items()}, knn1, title)
            if image_step is not None:
                self.log.image("probe/chart", chart, image_step)
        return results
