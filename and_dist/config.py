"""The run configuration: its schema (defaults = the paper's CIFAR setting), YAML file +
dotted `a.b=value` overrides, and validation before any work starts.

Parsing and type checking are generic (typed.py), so adding a section or a field is one line;
choices come from the registries (data sources, architectures). Mistakes fail early with a
one-line message naming the key (exit status 2).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from . import files
from .data import MAX_CACHED_SIZE, SOURCES, check_root
from .data.layout import check_layout_keys, find_file
from .errors import UserError
from .models import ARCHS
from .typed import (AT_LEAST_ONE, FRACTION, MOMENTUM, NON_NEGATIVE, POSITIVE, PROBABILITY, SCALE_RANGE,
                    ConfigError, apply_override, check_fields, describe, merge, opt, yaml_load)

__all__ = ["Config", "ConfigError", "load_config", "parse_args", "config_or_exit", "config_from_dict",
           "save_config", "to_dict", "validate"]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


# ----- schema (defaults = the paper's CIFAR setting)

AUTO_OR_POSITIVE = ("must be 'auto' or a positive integer", lambda v: v == "auto" or (type(v) is int and v > 0))

@dataclass
class DataConfig:
    source: str = opt("demo", choices=SOURCES)
    loader: str = opt("cached", choices=("cached", "dali", "torch"))  # cached: decoded in memory (<= 96 px)
    root: str = ""
    download: bool = False
    image_size: int = opt(32, check=POSITIVE)  # images are decoded once into a uint8 cache at this size
    cache_dir: str = ""  # "" -> <run dir>/../.cache (resolved by the trainer)
    flip: bool = True
    crop_scale: list[float] = opt([0.2, 1.0], check=SCALE_RANGE)
    jitter: float = opt(0.4, check=NON_NEGATIVE)
    grayscale_p: float = opt(0.2, check=PROBABILITY)
    workers: int = opt(2, check=NON_NEGATIVE)  # decode threads
    prefetch: int = opt(2, check=NON_NEGATIVE)  # in-memory data: batches built ahead on a worker thread; 0 = in the step
    compile_augment: bool = True  # CUDA: colour jitter as a few fused kernels (torch.compile), eager if that fails
    eval_resize: int = opt(0, check=NON_NEGATIVE)  # streamed eval: shorter side before the centre crop; 0 = image_size*256/224
    classes: str = opt("", "file of wnids, one a line: train and evaluate on those classes only (imagenet100.txt ships)")
    val_labels: str = opt("", "label file of a flat val/ folder: devkit ground truth, LOC_val_solution.csv or val.txt")
    val_ids: str = opt("", "the devkit's meta.mat or `id wnid` lines; default: meta.mat beside data.val_labels")
    demo_train: int = opt(5000, check=POSITIVE)
    demo_test: int = opt(1000, check=POSITIVE)
    demo_seed: int = 0


@dataclass
class ModelConfig:
    arch: str = opt("resnet18_cifar", choices=ARCHS)
    low_dim: int = opt(128, check=POSITIVE)
    sync_bn: bool = False


@dataclass
class BankConfig:
    temperature: float = opt(0.1, check=POSITIVE)
    momentum: float = opt(0.5, check=MOMENTUM)
    kernel: str = opt("auto", choices=("auto", "exact", "attention"))  # loss normaliser; auto: attention on CUDA


@dataclass
class CurriculumConfig:
    rounds: int = opt(5, check=AT_LEAST_ONE)
    method: str = opt("and", choices=("and", "instance"))  # instance: same budget, no anchors (baseline)
    anchor_rate: float = opt(0.25, check=FRACTION)
    neighbours: int = opt(1, check=AT_LEAST_ONE)


@dataclass
class DiscoveryConfig:
    backend: str = opt("torch", choices=("torch", "faiss"))  # kNN search of the exact/attention kernels
    chunk: int | str = opt("auto", check=AUTO_OR_POSITIVE)  # rows per similarity block; auto: from free memory
    kernel: str = opt("auto", choices=("auto", "exact", "attention", "fused"))  # auto: fused on CUDA, else exact
    precision: str = opt("auto", choices=("auto", "fp32", "bf16x3", "bf16"))  # auto: bf16x3 (fused), fp32


@dataclass
class TrainConfig:
    epochs_per_round: int = opt(200, check=AT_LEAST_ONE)
    batch_size: int = opt(128, check=POSITIVE)  # global batch (per-rank batch x world)
    lr: float = opt(0.03, check=POSITIVE)
    momentum: float = opt(0.9, check=MOMENTUM)
    nesterov: bool = True
    weight_decay: float = opt(5e-4, check=NON_NEGATIVE)
    schedule: str = opt("step", choices=("step", "cosine"))
    lr_first_decay: int = opt(80, check=NON_NEGATIVE)
    lr_decay_every: int = opt(40, check=AT_LEAST_ONE)
    lr_gamma: float = opt(0.1, check=FRACTION)
    seed: int = 0
    deterministic: bool = False  # deterministic kernels (CUDA: where torch has them, a warning where not)
    dtype: str = opt("float32", choices=("float32", "float64"))  # float64: bit-stable equivalence checks
    device: str = opt("auto", choices=("auto", "cpu", "cuda"))
    threads: int = opt(0, check=NON_NEGATIVE)  # torch intra-op threads, 0 = torch default
    precision: str = opt("auto", choices=("auto", "fp32", "bf16"))  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile the model


@dataclass
class EvalConfig:
    knn_k: int = opt(200, check=AT_LEAST_ONE)
    knn_sigma: float = opt(0.1, check=POSITIVE)
    every_epochs: int = opt(1, check=NON_NEGATIVE)  # 0 = never per epoch


@dataclass
class CheckpointConfig:
    every_epochs: int = opt(1, check=NON_NEGATIVE)  # 0 = only at the end
    keep: int = opt(2, check=AT_LEAST_ONE)


@dataclass
class LogConfig:
    progress: bool = True  # progress bars, on a terminal only; in a file one line per epoch
    every_steps: int = opt(10, check=AT_LEAST_ONE)  # step lines in metrics.jsonl
    wandb_mode: str = opt("disabled", choices=("online", "offline", "disabled"))
    wandb_project: str = "and_dist"
    wandb_entity: str = ""


@dataclass
class ProbeConfig:
    """Linear probes on frozen layers (the ImageNet AlexNet protocol of Wu et al. 2018 / AND)."""
    layers: list[str] = opt(["conv1", "conv2", "conv3", "conv4", "conv5"])
    epochs: int = opt(30, check=AT_LEAST_ONE)
    lr: float = opt(0.01, check=POSITIVE)
    batch_size: int = opt(256, check=POSITIVE)  # global
    momentum: float = opt(0.9, check=MOMENTUM)
    weight_decay: float = opt(5e-4, check=NON_NEGATIVE)
    lr_decay_epochs: list[int] = opt([10, 20])
    lr_gamma: float = opt(0.1, check=FRACTION)
    crop_scale: list[float] = opt([0.08, 1.0], check=SCALE_RANGE)  # RandomResizedCrop area of probe training images
    batch_norm: bool = True  # BatchNorm without affine before each linear layer
    ten_crop: bool = False
    after_train: bool = False  # run the probes right after pretraining, in the same job


@dataclass
class SlurmConfig:
    """Defaults for launch/slurm.py; its command-line flags win."""
    nodes: int = opt(1, check=AT_LEAST_ONE)
    gpus_per_node: int = opt(0, check=NON_NEGATIVE)
    tasks_per_node: int = opt(1, check=AT_LEAST_ONE)  # CPU partitions; with GPUs one task per GPU
    cpus_per_task: int = opt(8, check=AT_LEAST_ONE)
    mem: str = ""  # e.g. 64G; "" = the partition's default
    partition: str = ""
    time: int = opt(4320, check=AT_LEAST_ONE)  # minutes
    account: str = ""
    qos: str = ""
    constraint: str = ""
    exclude: str = ""
    job_name: str = ""  # "" = the run name
    max_requeues: int = opt(20, check=NON_NEGATIVE)
    folder: str = ""  # submitit logs; "" = <out_dir>/<name>/slurm


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    out_dir: str = "~/and_dist_runs"
    name: str = ""  # run name; "" -> the config file's stem; fresh runs go to out_dir/name/<time>
    run_dir: str = ""  # an explicit run directory, used as given (the SLURM launcher sets it)
    resume: str = ""  # "" (fresh), "auto" (latest run of this name, or run_dir), or a checkpoint path


# ----- validation (runs before any work starts)

def validate(cfg: Config) -> None:
    """Check types, choices, ranges, the data root and the resume path; raise ConfigError."""
    check_fields(cfg)
    try:
        check_root(cfg.data.source, cfg.data.root, cfg.data.download)
    except UserError as e:
        raise ConfigError(str(e)) from None
    try:
        check_layout_keys(cfg.data)
    except UserError as e:
        raise ConfigError(str(e)) from None
    if cfg.run_dir and cfg.resume not in ("", "auto"):
        raise ConfigError("run_dir with a checkpoint path in resume: use resume=auto to continue run_dir's run")
    if cfg.data.loader == "cached" and cfg.data.image_size > MAX_CACHED_SIZE:
        raise ConfigError(f"data.image_size={cfg.data.image_size}: the in-memory uint8 loader is for "
                          f"images up to {MAX_CACHED_SIZE} px; use data.loader=dali (DALI) or data.loader=torch "
                          "to stream larger images")
    if not cfg.name or "/" in cfg.name or cfg.name in (".", ".."):
        raise ConfigError(f"config key 'name' must be a plain folder name; got {cfg.name!r}")
    if cfg.resume not in ("", "auto") and not Path(cfg.resume).expanduser().exists():
        raise ConfigError(f"resume checkpoint '{cfg.resume}' does not exist "
                          "(use resume=auto for this run's latest checkpoint)")


# ----- public entry points

def find_config(config: str) -> Path:
    path = Path(config).expanduser()
    if path.is_file():
        return path
    if os.sep not in config:
        for candidate in (CONFIG_DIR / config, CONFIG_DIR / f"{config}.yaml"):
            if candidate.is_file():
                return candidate
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config '{config}' not found (not a file, not in {CONFIG_DIR}); "
                      f"available: {names}")


def load_config(config: str, overrides: list[str]) -> Config:
    """Defaults <- YAML file `config` (path or name in configs/) <- `a.b=value` overrides."""
    path = find_config(config)
    data = yaml_load(path.read_text(), str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, "
                          f"got {describe(data)}")
    cfg = Config()
    merge(cfg, data)
    for text in overrides:
        apply_override(cfg, text)
    cfg.name = cfg.name or path.stem
    cfg.out_dir = os.path.expanduser(cfg.out_dir)
    if cfg.data.root:  # relative to the launch directory; stored absolute so the run is portable
        cfg.data.root = os.path.abspath(os.path.expanduser(cfg.data.root))
    for key in ("classes", "val_labels", "val_ids"):   # absolute too (a shipped list: its path in configs/)
        setattr(cfg.data, key, find_file(getattr(cfg.data, key)))
    validate(cfg)
    return cfg


def parse_args(argv: list[str] | None = None) -> Config:
    """Command line: `--config NAME_OR_PATH` plus `section.key=value` overrides."""
    parser = argparse.ArgumentParser(
        prog="python -m and_dist.train",
        description="Train AND (neighbourhood discovery). Overrides use YAML values, "
                    "e.g. train.lr=0.1 train.nesterov=false data.crop_scale=[0.2,1.0]")
    parser.add_argument("--config", default="demo",
                        help=f"YAML path or a name in {CONFIG_DIR} (default: demo)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    return load_config(args.config, args.overrides)


def config_or_exit(argv: list[str] | None = None) -> Config:
    """parse_args for entry points: a config mistake is one `error:` line and exit status 2."""
    try:
        return parse_args(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def to_dict(cfg: Config) -> dict:
    return asdict(cfg)


def save_config(cfg: Config, path) -> None:
    """Write the resolved config as YAML (loadable again with load_config)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_from_dict(d: dict) -> Config:
    """A Config from a saved `to_dict` (a run's config.yaml or checkpoint), validated as types only."""
    cfg = Config()
    merge(cfg, d)
    check_fields(cfg)
    return cfg
