"""Linear probes on a trained run's frozen layers: `python -m and_dist.probe --checkpoint RUN
[--config FILE] [key=value ...]` (torchrun / srun too), or `probe.after_train: true` in training.
This is `python -m and_dist.evaluate probe` (the same inputs and checks, the same `run_probes`)
with its outputs kept in the run itself, beside the pretraining's: the SLURM probe job and
`probe.after_train` write the same files, and the same command continues them.

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

import torch

from .config import save_config
from .eval.prober import run_probes
from .evaluate import load_inputs, run_of
from .platform.errors import UserError
from .platform.log import RunLog
from .run.contents import RunState
from .run.entry import Session, user_error_exit
from .run.stop import Stop, exits_on_stop


def _inputs(checkpoint: str, config: str, overrides: list[str]):
    got = load_inputs("probe", checkpoint, config, overrides)
    if got.ckpt is None:
        raise UserError(f"--checkpoint {checkpoint} is a weights file; python -m and_dist.probe probes a run of "
                        "ours in place: use python -m and_dist.evaluate probe --checkpoint FILE")
    return got


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
    got = user_error_exit(_inputs, args.checkpoint, args.config, args.overrides)
    cfg, ckpt, run = got.cfg, got.ckpt, run_of(got.ckpt)

    def body(session: Session) -> int:
        env = session.env
        session.lock(run)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if env.is_main:
            save_config(cfg, run / "probes" / "config.yaml")
        saved = RunState(ckpt)
        log = RunLog.for_config(run, env.is_main, cfg)
        log.wandb_id = (saved.log or {}).get("wandb_id", log.wandb_id)      # the run's own wandb run
        step = saved.global_step
        log.info(f"probing {ckpt} (pretraining step {step}) on {env.device}, {env.world} rank(s)")
        log.start_wandb()
        try:
            with Stop() as stop:
                results = run_probes(cfg, env, run, got.model.to(env.device), log, stop=stop, step=step)
        finally:
            log.close()
        return 0 if results is not None else stop.exit_status()

    return Session(cfg.train).run(body)


if __name__ == "__main__":
    sys.exit(main())
