"""Linear probes on a trained run's frozen layers: `python -m and_dist.probe --checkpoint RUN
[--config FILE] [key=value ...]` (torchrun / srun too), or `probe.after_train: true` in training.

The run's config is the base; `--config` (e.g. only a `probe:` section) and dotted overrides
change it. Each layer of `probe.layers` gets a ~9k-d pooled feature (eval/probes.py), BN without
affine and a linear classifier; all heads train together (DDP over the heads) with SGD and a step
schedule on the train images under RandomResizedCrop + flip (no colour jitter, no grayscale). The
last epoch's top-1/top-5 on the test split go to RUN/probes.json and RUN/probes.png; every epoch
to metrics.jsonl and wandb.

Schedule: ~9k-d pooled conv features with a linear classifier per layer is the protocol of
Zhang et al. 2016 that Wu et al. 2018 and AND follow. The papers do not give the classifier's
optimiser: SGD lr 0.01, momentum 0.9, batch 256 (as the public DeepCluster evaluation of that
protocol), 30 epochs with lr x0.1 at 10 and 20, weight decay 5e-4 and crop scale (0.08, 1) are ours.

A signal saves RUN/probes/checkpoints/ at the next step and exits 128 + signal; the same command
continues there. Exit 0 when done, 2 for a user error (one line), 1 for anything else.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .run import checkpoint
from .config import Config, load_config, save_config
from .run.entry import Session, user_error_exit
from .platform.errors import UserError
from .eval.prober import run_probes
from .platform.log import RunLog
from .run.stop import Stop, exits_on_stop


def _checkpoint_dir(text: str) -> Path:
    """A run directory, its checkpoints/ folder, a checkpoint directory, or a `latest` file."""
    path = Path(text).expanduser()
    if path.is_file() and path.name == checkpoint.LATEST:
        path = path.parent / path.read_text().strip()
    try:
        return checkpoint.resolve(path)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None


def configure(cfg: Config, config: str, overrides: list[str]) -> Config:
    """The run's config <- the `config` YAML file (if any) <- `a.b=value` overrides, validated."""
    cfg.resume = ""          # the pretraining's resume path plays no part here
    return load_config(config, overrides, base=cfg)


def _load(checkpoint_arg: str, config: str, overrides: list[str]):
    from .eval.pretrained import load_model
    from .data.sources.images import NO_LABELS
    model, cfg, ckpt = load_model(_checkpoint_dir(checkpoint_arg))
    cfg = configure(cfg, config, overrides)
    if cfg.data.source == "images":
        raise UserError(NO_LABELS.format(source="images", what="a linear probe"))
    return model, cfg, ckpt


@exits_on_stop("run the same command again to continue")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m and_dist.probe", description=(
        "Linear probes on the frozen layers of a trained run. Overrides use YAML values, e.g. "
        "probe.epochs=10 probe.layers=[conv1,conv5] data.root=/data/imagenet"))
    parser.add_argument("--checkpoint", required=True, help="a run directory or a checkpoint directory "
                        "(RUN/checkpoints/latest is the newest)")
    parser.add_argument("--config", default="", help="YAML path or name in configs/ overriding the run's config")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    model, cfg, ckpt = user_error_exit(_load, args.checkpoint, args.config, args.overrides)
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt

    def body(session: Session) -> int:
        env = session.env
        session.lock(run)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if env.is_main:
            save_config(cfg, run / "probes" / "config.yaml")
        state = checkpoint.read_state(ckpt)
        log = RunLog.for_config(run, env.is_main, cfg)
        log.wandb_id = state.get("log", {}).get("wandb_id", log.wandb_id)   # the run's own wandb run
        step = state.get("progress", {}).get("global_step", 0)
        del state
        log.info(f"probing {ckpt} (pretraining step {step}) on {env.device}, {env.world} rank(s)")
        log.start_wandb()
        try:
            with Stop() as stop:
                results = run_probes(cfg, env, run, model.to(env.device), log, stop=stop, step=step)
        finally:
            log.close()
        return 0 if results is not None else stop.exit_status()

    return Session(cfg.train).run(body)


if __name__ == "__main__":
    sys.exit(main())
