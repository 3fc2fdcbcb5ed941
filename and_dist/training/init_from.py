"""`init_from=PATH`: a new run that starts from another run's weights, in its own run directory
with its own config (unlike `resume`, which continues the same run with its own config).

PATH is what `evaluate --checkpoint` accepts: a run directory, a checkpoint directory, a run-name
directory (its newest run) or a weights file. From a checkpoint of this project the new run
takes the model weights, the memory bank and the curriculum position: the round the source was
in (the next one after a round-end checkpoint; a mid-round checkpoint's round starts over at
epoch 0), so a branch after round 0 starts at round 1 with discovery run on the loaded bank.
`curriculum.rounds` counts from the source's round 0 (a branch after round 0 with rounds=5 trains
rounds 1-4, `train.epochs_per_round` each); the source's finished rounds are carried into the
round table and summary, and its global step into the step count. The optimizer is not carried
(every round restarts the learning rate; momentum starts from zero). A weights file gives the
weights only: the bank starts as a fresh run's, at round 0.

Mismatches are one line (UserError) before any training: model.arch, model.low_dim and
data.image_size against the source's (`check`, before the data is read), the bank's rows against
this data set's train images (`apply`). Once the new run has a checkpoint of its own, resume=auto
continues it and init_from is no longer read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..platform.errors import UserError


@dataclass
class Source:
    what: str                           # one line for the banner
    weights: dict                       # the model's state dict (ours, or a weights file's trunk)
    round: int = 0                      # the round the new run starts at
    rows: list = field(default_factory=list)   # the source's finished rounds (the round table)
    global_step: int = 0
    ckpt: Path | None = None            # a checkpoint of this project (it holds the bank)
    bank_rows: int | None = None        # its bank's N


def _mismatch(key: str, theirs, ours) -> UserError:
    return UserError(f"init_from: the source has {key}={theirs!r}, this run has {key}={ours!r}; "
                     f"use the source's {key} or another source")


def read_source(cfg) -> Source:
    """The source `cfg.init_from` names, checked against cfg's model and image size."""
    from ..config import shape_differences
    from ..eval.pretrained import resolve_trained
    from ..run.contents import RunState
    ckpt, weights, chosen = resolve_trained(cfg.init_from, "init_from")
    if weights is not None:
        return _weights_file(cfg, weights)
    saved = RunState(ckpt)
    for key, theirs, ours in shape_differences(saved.config(), cfg):
        raise _mismatch(key, theirs, ours)
    p = saved.progress
    start = p["round"]
    if start >= cfg.curriculum.rounds:
        raise UserError(f"init_from: the source has finished round {start - 1}, and curriculum.rounds="
                        f"{cfg.curriculum.rounds} counts from its round 0: nothing is left to train; "
                        f"raise curriculum.rounds above {start}")
    n = saved.bank_rows()
    bank = n is not None
    where = f"round {start}" + ("" if p["epoch"] == 0 and p["step"] == 0 else
                                f" (from its epoch {p['epoch']} step {p['step']}: the round starts over)")
    return Source(f"{chosen}: weights{', memory bank' if bank else ''}, starting at {where}",
                  saved.weights, start,
                  [r for r in p["rounds"] if r["round"] < start], p["global_step"], ckpt if bank else None, n)


def _weights_file(cfg, path: Path) -> Source:
    from ..eval.weights import load_weights
    got = load_weights(path, cfg.model.low_dim, cfg.data.image_size)
    if got.arch != cfg.model.arch:
        raise _mismatch("model.arch", got.arch, cfg.model.arch)
    weights = got.model.state_dict()
    if not got.has_head:                # the head stays this run's fresh one
        weights = {k: v for k, v in weights.items() if not k.startswith("head.")}
    return Source(f"{got.what}; weights only, starting at round 0", weights)


def apply(source: Source, model: torch.nn.Module, bank, progress) -> None:
    """Load the source into a freshly built run: weights, bank rows, progress counters."""
    from ..run import checkpoint
    if source.bank_rows is not None and source.bank_rows != bank.n:
        raise UserError(f"init_from: the source's memory bank has {source.bank_rows} rows, this run's data set "
                        f"has {bank.n} train images; use the source's data set")
    missing, unexpected = model.load_state_dict(source.weights, strict=False)
    if unexpected or [k for k in missing if not k.startswith("head.")]:
        raise UserError(f"init_from: the weights do not fit this model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    if source.ckpt is not None:
        checkpoint.load(source.ckpt, {"bank": bank})
    progress.round, progress.rounds = source.round, list(source.rows)
    progress.global_step = source.global_step
