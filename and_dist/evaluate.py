"""Evaluate trained weights without training: `python -m and_dist.evaluate {knn,probe,all}
--checkpoint PATH [--config NAME] [key=value ...]` (alone, under torchrun or srun).

PATH is a run directory, a checkpoint directory, a run-name directory (out_dir/name: its newest
run, as resume=auto picks it) or a weights file (eval/weights.py: torchvision, wrapped, released
AND). `knn` is the weighted kNN (eval.knn_k, eval.knn_sigma; eval.train_features=bank votes with
the memory bank instead of recomputed train features), `probe` the linear probes of probe.*
(and_dist/probe.py), `all` both. A run's own config is the base of --config and the overrides.

Every evaluation gets a new folder, RUN/evaluations/<time> (out_dir/<name>/evaluations/<time>
for a weights file, name defaulting to the file's stem), so probing again with other settings
never meets an earlier evaluation's probe checkpoint; `resume=auto` continues the newest one.
It holds config.yaml, evaluation.json (the table's numbers), metrics.jsonl, probes.json/png and
the wandb run. Exit 0 when done, 128 + N when signal N stopped it (the probes after a
checkpoint; the kNN pass at once, redone by resume=auto), 2 for a user error (one line), 1 for
anything else.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .run import rundir
from .run.contents import RunState
from .platform import dist, files
from .config import MODEL_SHAPE_WORDS, Config, load_config, model_shape, save_config
from .eval.pretrained import resolve_trained      # what --checkpoint PATH names (export.py takes it from here)
from .run.entry import Session, main_decides, main_rank, user_error_exit
from .platform.errors import UserError
from .platform.log import RunLog, fmt
from .platform.version import code_version
from .run.stop import Stop, Stopped, exits_on_stop, raising, test_signal

KINDS = ("knn", "probe", "all")


# ------------------------------------------------------------------------- what to evaluate

def run_of(ckpt: Path) -> Path:
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt


def evaluation_config(base: Config, config: str, overrides: list[str]) -> tuple[Config, str]:
    """(config, resume): base <- --config <- overrides; resume is "" or "auto"."""
    resume = ""
    rest = []
    for text in overrides:
        if text.startswith("resume="):
            resume = text.split("=", 1)[1]
        else:
            rest.append(text)
    if resume not in ("", "auto"):
        raise UserError(f"resume={resume!r}: an evaluation continues with resume=auto (its newest evaluation)")
    base.resume = ""          # the pretraining's resume path plays no part here
    cfg = load_config(config, rest, base=base)
    cfg.out_dir = os.path.expanduser(cfg.out_dir)
    return cfg, resume


@dataclass
class Inputs:
    """What an evaluation evaluates, every part checked before any folder is made."""
    model: torch.nn.Module
    cfg: Config
    resume: str                  # "" or "auto"
    parent: Path                 # where its evaluations/<time>/ folders go
    source: str                  # one line: what --checkpoint named
    ckpt: Path | None            # our checkpoint; None for a weights file
    bank: torch.Tensor | None    # a weights file's memory bank, if it has one


def load_inputs(kind: str, checkpoint: str, config: str, overrides: list[str]) -> Inputs:
    """The model, config and sources of `evaluate KIND --checkpoint PATH [--config] [overrides]`,
    checked (`check_inputs`) before any folder is made."""
    got = _load(checkpoint, config, overrides)
    check_inputs(kind, got.cfg, got.model, got.bank, got.ckpt)
    return got


def check_inputs(kind: str, cfg: Config, model, bank, ckpt: Path | None) -> None:
    """What the evaluation would otherwise find wrong only after its folder was made: layers the
    model lacks, a memory bank that is not there."""
    from .data.sources.images import NO_LABELS
    from .eval.prober import check_layers
    if cfg.data.source == "images":
        raise UserError(NO_LABELS.format(source="images", what="evaluation"))
    if kind in ("probe", "all"):
        check_layers(cfg, model)
    if kind in ("knn", "all") and cfg.eval.train_features == "bank" and bank is None and (
            ckpt is None or not RunState(ckpt).bank_files()):
        raise UserError("eval.train_features=bank: this checkpoint holds no memory bank")


def _load(checkpoint: str, config: str, overrides: list[str]) -> Inputs:
    from .eval.pretrained import load_model
    from .eval.weights import load_weights
    ckpt, weights, chosen = resolve_trained(checkpoint)
    if ckpt is not None:
        model, base, ckpt = load_model(ckpt)
        own = model_shape(base)                  # before evaluation_config: it merges into `base` itself
        cfg, resume = evaluation_config(base, config, overrides)
        if model_shape(cfg) != own:
            arch, low_dim, size = own.values()
            raise UserError(f"{MODEL_SHAPE_WORDS} stay the run's own ({arch}, {low_dim}, {size} px) when evaluating a run")
        return Inputs(model, cfg, resume, run_of(ckpt) / "evaluations", chosen, ckpt, None)
    base = Config()
    base.name = weights.stem
    cfg, resume = evaluation_config(base, config, overrides)
    got = load_weights(weights, cfg.model.low_dim, cfg.data.image_size)
    cfg.model.arch = got.arch
    return Inputs(got.model, cfg, resume, Path(cfg.out_dir) / cfg.name / "evaluations", f"{chosen}; {got.what}",
                  None, got.bank)


def choose_dir(parent: Path, resume: str) -> tuple[Path, bool]:
    """A new evaluation folder under `parent`, or with resume=auto its newest one (rank 0)."""
    try:
        return rundir.choose(str(parent.parent), parent.name, "", resume)
    except OSError as e:
        raise UserError(str(e)) from None


# ------------------------------------------------------------------------------ evaluating

def knn(cfg: Config, env, model, log: RunLog, bank, ckpt: Path | None, dtype) -> tuple[float, float]:
    from .data import build_data
    from .eval.knn import knn_eval
    from .data.sources.images import NO_LABELS, labelled
    data = build_data(cfg, env, None, log.info, log.tty)
    test_signal("knn")                                            # test hook (AND_TEST_SIGNAL_AT)
    if not labelled(data):                   # a pack of a folder without labels
        raise UserError(NO_LABELS.format(source=cfg.data.source, what="kNN"))
    feats = None
    if cfg.eval.train_features == "bank":
        n = len(data.train)
        lo, hi = dist.shard_range(n, env.world, env.rank)
        if bank is not None:
            if len(bank) != n:
                raise UserError(f"eval.train_features=bank: the file's memory bank has {len(bank)} rows, "
                                f"data.source={cfg.data.source} has {n} train images")
            feats = bank[lo:hi]
        elif ckpt is not None:
            feats = RunState(ckpt).bank_slice(n, lo, hi)
        if feats is None:
            raise UserError("eval.train_features=bank: this checkpoint holds no memory bank")
        feats = feats.to(env.device, dtype)
    e = cfg.eval
    return knn_eval(model, data, env, e.knn_k, e.knn_sigma, feats, dtype, log.bar)


def format_table(rows: list[tuple[str, float | None, float | None]]) -> str:
    width = max(len(r[0]) for r in rows)
    lines = [f"  {'':<{width}}  top-1   top-5"]
    lines += [f"  {name:<{width}}  {fmt(t1):>5}   {fmt(t5):>5}" for name, t1, t5 in rows]
    return "\n".join(lines)


def run_evaluation(kind: str, cfg: Config, env, model, out: Path, resuming: bool, source: str,
             ckpt: Path | None, bank, stop: Stop) -> int:
    from .eval.prober import final_knn, run_probes
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    record = out / "evaluation.json"
    old = json.loads(record.read_text()) if resuming and record.exists() else {}
    if old.get("kind", kind) != kind:
        raise UserError(f"resume=auto continues {out}, whose kind is '{old['kind']}'; ask for "
                        f"'{old['kind']}' again, or leave resume out for a new evaluation")
    log = RunLog.for_config(out, env.is_main, cfg, name=f"{cfg.name}-eval-{out.name}")
    log.wandb_id = old.get("wandb_id", log.wandb_id)
    step = RunState(ckpt).global_step if ckpt is not None else 0
    result = {"kind": kind, "source": source, "checkpoint": str(ckpt) if ckpt else None,
              "arch": cfg.model.arch, "wandb_id": log.wandb_id, "finished": False,
              "code": code_version()}
    if env.is_main:
        save_config(cfg, out / "config.yaml")
        files.write_text(record, json.dumps(result, indent=2))
    dtype = getattr(torch, cfg.train.dtype)
    model = model.to(env.device, dtype).eval()
    log.info(f"evaluation {out} ({'continued' if resuming else 'new'}): {kind} on {env.device}, {env.world} rank(s)")
    log.start_wandb()
    try:
        rows = []
        if kind in ("knn", "all"):
            if stop.signum is not None:
                raise Stopped(stop.signum)
            with raising():           # a pass with no steps to checkpoint: a stop ends it at once
                top1, top5 = knn(cfg, env, model, log, bank, ckpt, dtype)
            result.update(knn_top1=top1, knn_top5=top5)
            rows.append((f"kNN (k={cfg.eval.knn_k}, {cfg.eval.train_features})", top1, top5))
            log.event(event="knn", step=step, knn_top1=top1, knn_top5=top5)
        if kind in ("probe", "all"):
            shown = (result["knn_top1"], result["knn_top5"]) if kind == "all" else (
                final_knn(run_of(ckpt)) if ckpt is not None else None)
            log.group("probe", cfg.probe.layers, "epoch")
            probes = run_probes(cfg, env, run_of(ckpt) if ckpt is not None else out, model, log,
                                stop=stop, step=step, out_dir=out, knn=shown)
            if probes is None:
                return stop.exit_status()
            result["probes"] = {n: {"top1": r["top1"], "top5": r["top5"]} for n, r in probes["layers"].items()}
            rows += [(f"probe {n}", r["top1"], r["top5"]) for n, r in probes["layers"].items()]
            if kind == "probe" and shown and shown[0] is not None:
                rows.append(("kNN (the run's final)", *shown))
                result.update(run_knn_top1=shown[0], run_knn_top5=shown[1])
        top1s = {name: t1 for name, t1, _ in rows}
        log.bar_chart("evaluation/top1", top1s, f"{cfg.name}: top-1 by layer, kNN beside ({out.name})")
        result["finished"] = True
        if env.is_main:
            files.write_text(record, json.dumps(result, indent=2))
        log.info(f"{source}\n{format_table(rows)}\n  ({record})")
        return 0
    finally:
        log.close()


@exits_on_stop("run the same command with resume=auto to continue")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m and_dist.evaluate", description=(
        "kNN and/or linear probes of trained weights, without training. Overrides use YAML values, "
        "e.g. probe.layers=[layer3,layer4] eval.knn_k=200 data.root=/data/cifar"))
    parser.add_argument("kind", choices=KINDS, help="knn: the weighted kNN; probe: the linear probes; all: both")
    parser.add_argument("--checkpoint", required=True, help="a run directory, a checkpoint directory, a "
                        "run-name directory (its newest run) or a weights file")
    parser.add_argument("--config", default="", help="YAML path or name in configs/ (default: the run's own config)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    got = user_error_exit(load_inputs, args.kind, args.checkpoint, args.config, args.overrides)
    if main_rank():
        print(f"evaluating {got.source}", flush=True)

    def body(session: Session) -> int:
        out, resuming = main_decides(session.env, lambda: choose_dir(got.parent, got.resume))
        session.lock(out)
        with Stop() as stop:
            return run_evaluation(args.kind, got.cfg, session.env, got.model, out, resuming, got.source, got.ckpt,
                                  got.bank, stop)

    return Session(got.cfg.train).run(body)


if __name__ == "__main__":
    sys.exit(main())
