"""Train AND: `python -m and_dist.train --config demo [key=value ...]`, or under torchrun / srun.

Exit status: 0 when the run finished; 128 + N when signal N stopped it after saving a checkpoint
(143 for SIGTERM, 130 for SIGINT, 140 for SIGUSR2); 2 for a user error (config, data, run
directory, checkpoint), reported in one line before training starts where possible; 3 when a
rank stopped answering for train.collective_timeout (the line names it); 1 for
anything else, one line per failing rank, the traceback in the run's `errors.log` (and on the
console with AND_DEBUG=1).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from .run import checkpoint, rundir
from .run.contents import RunState
from .platform import dist, precision
from .config import Config, config_or_exit, save_config
from .data import build_data
from .data.sources.images import labelled
from .run.entry import Session, main_decides
from .platform.errors import UserError
from .platform.log import RunLog
from .platform.version import code_version, describe_version
from .method.bank import ShardedBank
from .method.curriculum import Curriculum
from .models import build_model, convert_global_bn
from .eval.prober import check_layers, run_probes
from .training import init_from
from .training.report import Report
from .training.state import Progress
from .run.stop import Stop, exits_on_stop
from .training.trainer import Trainer


def _choose_run_dir(cfg: Config) -> tuple[Path, Path | None]:
    """(run directory, checkpoint to resume or None), as rank 0 decides them."""
    if cfg.resume not in ("", "auto"):
        ckpt = checkpoint.resolve(Path(cfg.resume))
        run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else rundir.choose(
            cfg.out_dir, cfg.name, cfg.run_dir, "")[0]
        return run, ckpt
    run, resuming = rundir.choose(cfg.out_dir, cfg.name, cfg.run_dir, cfg.resume)
    return run, (checkpoint.find_latest(run / "checkpoints", clean=True) if resuming else None)


def build_trainer(cfg: Config, env, run: Path, ckpt: Path | None, stop: Stop) -> Trainer:
    """Wire the components of a run and restore them from `ckpt` if given, else from init_from if
    set. A fresh run's config.yaml (what makes it a run) is written once the source fits."""
    t = cfg.train
    source = init_from.read_source(cfg) if cfg.init_from and ckpt is None else None
    if t.threads:
        torch.set_num_threads(t.threads)
    cuda = env.device.type == "cuda"
    if t.deterministic:
        if cuda:   # cuBLAS reads this when its first handle is made, i.e. at the first matmul
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # CUDA has no deterministic AdaptiveAvgPool2d / NLLLoss backward: warn there, never fail
        torch.use_deterministic_algorithms(True, warn_only=cuda)
    elif cuda:
        torch.backends.cudnn.benchmark = True      # fixed shapes: autotuned conv algorithms pay
    torch.manual_seed(t.seed)
    log = RunLog.for_config(run, env.is_main, cfg)
    data = build_data(cfg, env, None, log.info, log.tty)
    if data.steps(0, 0) == 0:
        raise UserError(f"{len(data.train)} train images cannot fill one step: each of the {env.world} ranks "
                        f"needs at least one image of every batch (train.batch_size={t.batch_size})")
    dtype = getattr(torch, t.dtype)
    model = build_model(cfg.model.arch, cfg.model.low_dim, cfg.data.image_size)
    if cfg.model.sync_bn and env.world > 1:
        model = convert_global_bn(model)
    model = model.to(env.device, dtype)
    if cfg.probe.after_train:
        check_layers(cfg, model)
    channels_last = precision.set_layout(model, env.device)
    forward = dist.data_parallel(model, env)
    forward = precision.wrap(forward, env.device, t.precision, channels_last, t.compile, dtype)
    opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, nesterov=t.nesterov,
                          weight_decay=t.weight_decay)
    bank = ShardedBank(len(data.train), cfg.model.low_dim, momentum=cfg.bank.momentum,
                       seed=t.seed, device=env.device, dtype=dtype)
    trainer = Trainer(cfg=cfg, env=env, run_dir=run, data=data, model=model, forward=forward, opt=opt, bank=bank,
                      curriculum=Curriculum(cfg.curriculum.anchor_rate, cfg.curriculum.method),
                      progress=Progress(), log=log, report=Report(run, log, env.is_main), stop=stop)
    if source is not None:
        init_from.apply(source, model, bank, trainer.progress)
    if env.is_main:
        save_config(cfg, run / "config.yaml")
    if ckpt is not None:
        saved = RunState(ckpt)                 # state.pt read once, for the owners and the log
        saved.restore({k: v for k, v in trainer.checkpoint_owners().items() if k != "log"})
        log.load_state_dict(_log_state(cfg, run, saved, trainer.progress))
    _banner(log, cfg, env, run, data, ckpt, trainer.progress, source)
    if not labelled(data):
        log.info(f"data.source={cfg.data.source} has no labels: the kNN evaluation is skipped "
                 "(discovery, its label-free measures and the pictures still run)")
    log.start_wandb()
    return trainer


def _log_state(cfg, run: Path, saved: RunState, p: Progress) -> dict:
    """The metrics lines to keep on resume: the training checkpoint's, or, once training is done
    and `after_train` probes of these weights were checkpointed, the later probe checkpoint's."""
    probe = checkpoint.find_latest(run / "probes" / "checkpoints") if cfg.probe.after_train else None
    if probe is not None and p.round >= cfg.curriculum.rounds:
        later = RunState(probe)
        if later.progress["source"].get("pretrain_step") == p.global_step and later.log is not None:
            return later.log
    return saved.log


def _banner(log, cfg, env, run, data, ckpt, p, source) -> None:
    skipped = len(data.train.skipped) + len(data.test.skipped)
    if env.is_main and skipped:
        lines = [f"{path}\t{reason}" for path, reason in data.train.skipped + data.test.skipped]
        (run / "skipped.txt").write_text("\n".join(lines) + "\n", errors="surrogateescape")
    where = f"resuming {ckpt} at round {p.round} epoch {p.epoch} step {p.step}" if ckpt else (
        f"fresh run from {source.what}" if source else "fresh run")
    log.info(f"run directory {run}\n"
             f"  config {cfg.name}; {where}\n"
             f"  device {env.device}, {env.world} rank{'s' if env.world > 1 else ''}, {cfg.train.dtype}\n"
             f"  code {describe_version(code_version())}\n"
             f"  data {cfg.data.source}: {len(data.train)} train / {len(data.test)} test images, "
             f"{len(data.train.classes)} classes, {skipped} skipped" + (" (skipped.txt)" if skipped else ""))


@exits_on_stop("continue with resume=auto")
def main(argv: list[str] | None = None) -> int:
    cfg = config_or_exit(argv)
    return Session(cfg.train).run(lambda session: _train(cfg, session))


def _train(cfg: Config, session: Session) -> int:
    """Rank 0 picks the run directory; every rank builds the run, trains it and, when asked,
    probes it. Returns the exit status."""
    run, ckpt = main_decides(session.env, lambda: _choose_run_dir(cfg))
    if ckpt is None and not cfg.run_dir:
        session.created(run)
    session.lock(run)
    with Stop() as stop:
        trainer = build_trainer(cfg, session.env, run, ckpt, stop)
        try:
            done = trainer.run() is not None
            if done and cfg.probe.after_train and not labelled(trainer.data):
                trainer.log.info(f"probe.after_train: data.source={cfg.data.source} has no labels, "
                                 "so the linear probes are skipped")
            elif done and cfg.probe.after_train:
                trainer.data = None                # the probes load their own (on the GPU too)
                done = run_probes(cfg, session.env, run, trainer.model, trainer.log, stop=stop,
                                  step=trainer.progress.global_step) is not None
        finally:
            trainer.log.close()
        status = 0 if done else stop.exit_status()
    del trainer  # DDP must go before its process group, or gloo aborts at exit
    return status


if __name__ == "__main__":
    sys.exit(main())
