"""Typed run configuration: dataclass defaults <- YAML file <- dotted `a.b=value` overrides.

Everything is driven generically by the dataclass fields and their type hints, so adding a
section or a field is one line; mistakes fail early with a one-line message naming the key.
"""
from __future__ import annotations

import argparse
import difflib
import functools
import os
import re
import sys
import types
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from . import files
from .data import MAX_CACHED_SIZE, SOURCES, check_root
from .errors import UserError
from .models import ARCHS

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(UserError):
    """A user mistake in the configuration; the message is one line meant for the terminal."""


# ----- field helpers: choices and range checks live in field metadata so validation is generic

POSITIVE = ("must be > 0", lambda v: v > 0)
NON_NEGATIVE = ("must be >= 0", lambda v: v >= 0)
AT_LEAST_ONE = ("must be >= 1", lambda v: v >= 1)
MOMENTUM = ("must be in [0, 1)", lambda v: 0 <= v < 1)
PROBABILITY = ("must be in [0, 1]", lambda v: 0 <= v <= 1)
FRACTION = ("must be in (0, 1]", lambda v: 0 < v <= 1)
SCALE_RANGE = ("must be [min, max] with 0 < min <= max <= 1",
               lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1)


def opt(default, *, choices: tuple = (), check: tuple | None = None):
    """A dataclass field carrying its allowed choices and/or range check."""
    meta = {"choices": choices, "check": check}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# ----- schema (defaults = the paper's CIFAR setting)

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


@dataclass
class CurriculumConfig:
    rounds: int = opt(5, check=AT_LEAST_ONE)
    method: str = opt("and", choices=("and", "instance"))  # instance: same budget, no anchors (baseline)
    anchor_rate: float = opt(0.25, check=FRACTION)
    neighbours: int = opt(1, check=AT_LEAST_ONE)


@dataclass
class DiscoveryConfig:
    backend: str = opt("torch", choices=("torch", "faiss"))
    chunk: int = opt(2048, check=POSITIVE)
    precision: str = opt("fp32", choices=("fp32", "bf16"))


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
    deterministic: bool = False
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


# ----- YAML: PyYAML (YAML 1.1) reads `1e-3` as a string; accept it as a float like users expect

class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _yaml_load(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
        detail = f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else str(e)
        raise ConfigError(f"cannot parse {where}: {' '.join(detail.split())}") from None


# ----- generic typed merge

@functools.cache
def _hints(cls) -> dict[str, Any]:
    return get_type_hints(cls)


def _type_name(tp) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    return getattr(tp, "__name__", str(tp))


def _describe(value) -> str:
    if value is None:
        return "null"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _coerce(path: str, tp, value):
    """Return `value` checked against type `tp` (ints widen to float; bools are not ints)."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _coerce(path, arg, value)
                except ConfigError:
                    pass
    elif origin is list:
        if isinstance(value, list):
            return [_coerce(f"{path}[{i}]", args[0], v) for i, v in enumerate(value)]
    elif tp is float and type(value) is int:
        return float(value)
    elif type(value) is tp:
        return value
    raise ConfigError(f"config key '{path}' expects {_type_name(tp)}, got {_describe(value)}")


def _unknown_key(obj, path: str) -> ConfigError:
    """Name the bad key and suggest close valid keys of the same section (or list them all)."""
    section, _, name = path.rpartition(".")
    valid = list(_hints(type(obj)))
    full = (lambda k: f"{section}.{k}") if section else (lambda k: k)
    close = difflib.get_close_matches(name, valid, n=3)
    if not close:  # e.g. `batch_size=3` given without its section
        close = [f"{k}.{name}" for k in valid
                 if is_dataclass(getattr(obj, k)) and name in _hints(type(getattr(obj, k)))]
    if close:
        return ConfigError(f"unknown config key '{path}'; did you mean "
                           + " or ".join(f"'{full(k)}'" for k in close) + "?")
    where = f"under '{section}'" if section else "at the top level"
    return ConfigError(f"unknown config key '{path}'; valid keys {where}: {', '.join(valid)}")


def _assign(obj, name: str, value, path: str) -> None:
    """Set one field: sections merge a mapping recursively, leaves are type-checked."""
    current = getattr(obj, name)
    if is_dataclass(current):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{path}' is a section and expects a mapping, "
                              f"got {_describe(value)}")
        _merge(current, value, path)
    else:
        setattr(obj, name, _coerce(path, _hints(type(obj))[name], value))


def _merge(obj, mapping: dict, prefix: str = "") -> None:
    hints = _hints(type(obj))
    for key, value in mapping.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            raise _unknown_key(obj, path)
        _assign(obj, key, value, path)


def _apply_override(cfg: Config, text: str) -> None:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{text}' must look like key=value (e.g. train.lr=0.1)")
    obj, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        path = ".".join(parts[: i + 1])
        if part not in _hints(type(obj)):
            raise _unknown_key(obj, path)
        if i < len(parts) - 1:
            obj = getattr(obj, part)
            if not is_dataclass(obj):
                raise ConfigError(f"config key '{path}' is a value, not a section; "
                                  f"cannot set '{key}'")
    tp = _hints(type(obj))[parts[-1]]
    value = "" if not raw.strip() else _yaml_load(raw, f"override '{text}'")
    if tp is str and value is not None and not isinstance(value, str):  # name=2024 means text
        value = raw.strip()
    _assign(obj, parts[-1], value, key)


# ----- validation (runs before any work starts)

def _check_fields(obj, prefix: str = "") -> None:
    hints = _hints(type(obj))
    for f in fields(obj):
        path, value = prefix + f.name, getattr(obj, f.name)
        if is_dataclass(value):
            _check_fields(value, path + ".")
            continue
        value = _coerce(path, hints[f.name], value)
        choices, check = f.metadata.get("choices"), f.metadata.get("check")
        if choices and value not in choices:
            raise ConfigError(f"config key '{path}' must be one of {', '.join(choices)}; "
                              f"got {value!r}")
        if check and value is not None and not check[1](value):
            raise ConfigError(f"config key '{path}' {check[0]}; got {value!r}")


def validate(cfg: Config) -> None:
    """Check types, choices, ranges, the data root and the resume path; raise ConfigError."""
    _check_fields(cfg)
    try:
        check_root(cfg.data.source, cfg.data.root, cfg.data.download)
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

def _find_config(config: str) -> Path:
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
    path = _find_config(config)
    data = _yaml_load(path.read_text(), str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, "
                          f"got {_describe(data)}")
    cfg = Config()
    _merge(cfg, data)
    for text in overrides:
        _apply_override(cfg, text)
    cfg.name = cfg.name or path.stem
    cfg.out_dir = os.path.expanduser(cfg.out_dir)
    if cfg.data.root:  # relative to the launch directory; stored absolute so the run is portable
        cfg.data.root = os.path.abspath(os.path.expanduser(cfg.data.root))
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
    _merge(cfg, d)
    _check_fields(cfg)
    return cfg
