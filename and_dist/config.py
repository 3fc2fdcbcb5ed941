"""The run configuration: its schema (defaults = the paper's CIFAR setting), YAML file +
dotted `a.b=value` overrides, and validation before any work starts.

Parsing and type checking are generic (typed.py), so adding a section or a field is one line
with its help; choices come from the modules that own them (data sources and loaders,
architectures, kernels). Mistakes, invalid combinations included, fail before any work with a
one-line message naming the key (exit status 2). tools/docs.py writes the key table of
docs/config.md from the fields' helps.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from .data.sources import LOADERS, MAX_CACHED_SIZE, SOURCES, check_pack_options, check_root
from .method.choices import BACKENDS, BANK_KERNELS, DISCOVERY_KERNELS, METHODS, PRECISIONS, resolve_kernel
from .models import ARCHS
from .platform import files
from .platform.errors import UserError
from .platform.typed import (AT_LEAST_ONE, FRACTION, MOMENTUM, NON_NEGATIVE, POSITIVE, PROBABILITY, SCALE_RANGE,
                             ConfigError, apply_override, check_fields, describe_value, merge, opt, yaml_load)

__all__ = ["Config", "ConfigError", "load_config", "parse_args", "config_or_exit", "config_from_dict",
           "save_config", "to_dict", "validate"]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


# ----- schema (defaults = the paper's CIFAR setting; every field's help feeds the README's table)

AUTO_OR_POSITIVE = ("must be 'auto' or a positive integer", lambda v: v == "auto" or (type(v) is int and v > 0))


@dataclass
class DataConfig:
    """Where images come from and how they are augmented."""
    source: str = opt("demo", "where images come from: the embedded demo set, an ImageFolder tree, a folder of "
                      "unlabelled images (images: every image under root, no kNN or probes), a pack of either "
                      "(prepare --pack), or official CIFAR/SVHN files", choices=SOURCES)
    loader: str = opt("cached", "cached: decoded once into memory (up to 96 px); dali, torch: streamed from files "
                      "(NVIDIA DALI or PIL workers)", choices=LOADERS)
    root: str = opt("", "the data set's folder (stored absolute); unused by the demo source")
    download: bool = opt(False, "CIFAR/SVHN: download the official files into root if missing")
    image_size: int = opt(32, "training and evaluation side in pixels (cached images are decoded once at it)",
                          check=POSITIVE)
    cache_dir: str = opt("", "decoded-image and file-index caches; \"\" = <out_dir>/.cache, shared by all runs")
    flip: bool = opt(True, "RandomHorizontalFlip")
    crop_scale: list[float] = opt([0.2, 1.0], "RandomResizedCrop area range", check=SCALE_RANGE)
    jitter: float = opt(0.4, "ColorJitter strength (brightness, contrast, saturation; hue min(j, 0.5))",
                        check=NON_NEGATIVE)
    grayscale_p: float = opt(0.2, "RandomGrayscale probability", check=PROBABILITY)
    workers: int = opt(2, "decode threads (file checks, DALI) or DataLoader worker processes (torch loader)",
                       check=NON_NEGATIVE)
    prefetch: int = opt(2, "in-memory data: batches built ahead on a worker thread; 0 = in the step",
                        check=NON_NEGATIVE)
    compile_augment: bool = opt(True, "CUDA: colour jitter as a few fused kernels (torch.compile), eager if "
                                "that fails")
    eval_resize: int = opt(0, "streamed evaluation: shorter side before the centre crop; 0 = image_size x 256/224",
                           check=NON_NEGATIVE)
    classes: str = opt("", "file of wnids, one a line: train and evaluate on those classes only (imagenet100.txt ships)")
    val_labels: str = opt("", "label file of a flat val/ folder: devkit ground truth, LOC_val_solution.csv or val.txt")
    val_ids: str = opt("", "the devkit's meta.mat or `id wnid` lines; default: meta.mat beside data.val_labels")
    demo_train: int = opt(5000, "demo source: train images generated", check=POSITIVE)
    demo_test: int = opt(1000, "demo source: test images generated", check=POSITIVE)
    demo_seed: int = opt(0, "demo source: the generator's seed")


@dataclass
class ModelConfig:
    """The backbone and its embedding."""
    arch: str = opt("resnet18_cifar", "the backbone", choices=ARCHS)
    low_dim: int = opt(128, "embedding size (the bank's width)", check=POSITIVE)
    sync_bn: bool = opt(False, "batch-norm statistics over the global batch (any backend), so W ranks train what "
                        "one process would")


@dataclass
class BankConfig:
    """The memory bank and its non-parametric softmax."""
    temperature: float = opt(0.1, "softmax temperature of the non-parametric classifier", check=POSITIVE)
    momentum: float = opt(0.5, "bank update v <- normalise(m v + (1 - m) f)", check=MOMENTUM)
    kernel: str = opt("auto", "the loss normaliser's per-shard part; auto: attention on CUDA, exact on CPU",
                      choices=BANK_KERNELS)


@dataclass
class CurriculumConfig:
    """Rounds and anchors (AND's progressive neighbourhood curriculum)."""
    rounds: int = opt(5, "rounds of training; discovery before each round after the first", check=AT_LEAST_ONE)
    method: str = opt("and", "and: anchors from discovery; instance: the same budget without anchors (baseline)",
                      choices=METHODS)
    anchor_rate: float = opt(0.25, "fraction of samples added as anchors each round", check=FRACTION)
    neighbours: int = opt(1, "an anchor's nearest neighbours taken as positives", check=AT_LEAST_ONE)


@dataclass
class DiscoveryConfig:
    """How entropies and nearest neighbours of the whole bank are computed."""
    backend: str = opt("torch", "nearest-neighbour search of the exact/attention kernels", choices=BACKENDS)
    chunk: int | str = opt("auto", "bank rows per similarity block; auto: sized from free memory",
                           check=AUTO_OR_POSITIVE)
    kernel: str = opt("auto", "entropy + neighbours; auto: fused on CUDA with Triton (attention with faiss), "
                      "else exact", choices=DISCOVERY_KERNELS)
    precision: str = opt("auto", "similarities; auto: bf16x3 with the fused kernel (fp32-accurate), else fp32",
                         choices=PRECISIONS)
    view_sample: int = opt(1024, "samples whose fresh augmented view is searched in the bank at each discovery "
                           "(label-free view_agreement); 0: not measured", check=NON_NEGATIVE)


@dataclass
class TrainConfig:
    """The optimiser, its schedule, and how the model runs."""
    seed: int = opt(0, "the seed of the model, the bank, the data order and the augmentation")
    epochs_per_round: int = opt(200, "epochs in each round", check=AT_LEAST_ONE)
    batch_size: int = opt(128, "global batch (per-rank batch x world)", check=POSITIVE)
    lr: float = opt(0.03, "learning rate at the start of every round", check=POSITIVE)
    momentum: float = opt(0.9, "SGD momentum", check=MOMENTUM)
    nesterov: bool = opt(True, "Nesterov momentum")
    weight_decay: float = opt(5e-4, "SGD weight decay", check=NON_NEGATIVE)
    schedule: str = opt("step", "step: x lr_gamma at lr_first_decay, then every lr_decay_every epochs; cosine: "
                        "over the round", choices=("step", "cosine"))
    lr_first_decay: int = opt(80, "step schedule: epoch of the first decay", check=NON_NEGATIVE)
    lr_decay_every: int = opt(40, "step schedule: epochs between later decays", check=AT_LEAST_ONE)
    lr_gamma: float = opt(0.1, "step schedule: factor of each decay", check=FRACTION)
    deterministic: bool = opt(False, "deterministic kernels (CUDA: where torch has them, a warning where not)")
    dtype: str = opt("float32", "parameters and bank; float64 for bit-stable equivalence checks",
                     choices=("float32", "float64"))
    device: str = opt("auto", "auto: CUDA when there is a GPU, else CPU", choices=("auto", "cpu", "cuda"))
    threads: int = opt(0, "torch intra-op threads; 0 = torch's default", check=NON_NEGATIVE)
    precision: str = opt("auto", "the model's forward; auto: bf16 autocast on CUDA, fp32 on CPU",
                         choices=("auto", "fp32", "bf16"))
    compile: bool = opt(False, "torch.compile the model")
    collective_timeout: float = opt(
        600.0, "seconds any rank waits for another (collectives, barriers, the rendezvous) before the run "
        "stops naming the silent rank; 600 covers a 1.28M-row discovery or evaluation on a GPU (~60 s on "
        "the exact path) ten times over; CPU runs at that scale need hours", check=POSITIVE)


@dataclass
class EvalConfig:
    """The weighted kNN evaluation."""
    knn_k: int = opt(200, "weighted kNN: neighbours that vote", check=AT_LEAST_ONE)
    knn_sigma: float = opt(0.1, "weighted kNN: temperature of the votes exp(s / sigma)", check=POSITIVE)
    every_epochs: int = opt(1, "bank kNN every this many epochs; 0 = never (the round-end kNN always runs)",
                            check=NON_NEGATIVE)
    train_features: str = opt("recompute", "evaluate: kNN train features recomputed with test transforms, or the "
                              "checkpoint's memory bank", choices=("recompute", "bank"))


@dataclass
class CheckpointConfig:
    """When checkpoints are written and how many are kept."""
    every_epochs: int = opt(1, "checkpoint every this many epochs; 0 = only at round ends and signals",
                            check=NON_NEGATIVE)
    keep: int = opt(2, "checkpoints kept (the newest)", check=AT_LEAST_ONE)


@dataclass
class LogConfig:
    """Console, metrics.jsonl and wandb."""
    progress: bool = opt(True, "progress bars on a terminal; in a log file a line a minute for long steps")
    every_steps: int = opt(10, "a step line in metrics.jsonl every this many steps", check=AT_LEAST_ONE)
    profile_steps: int = opt(0, "trace this many steps after a 5-step warm-up with torch.profiler into "
                             "RUN/profile (trace.json, summary.txt; on CUDA memory.pickle); 0 = off",
                             check=NON_NEGATIVE)
    wandb_mode: str = opt("disabled", "wandb: online (falls back to offline), offline, or disabled",
                          choices=("online", "offline", "disabled"))
    wandb_project: str = opt("and_dist", "wandb project")
    wandb_entity: str = opt("", "wandb entity (team); \"\" = your default")


@dataclass
class ProbeConfig:
    """Linear probes on frozen layers (the ImageNet AlexNet protocol of Wu et al. 2018 / AND)."""
    layers: list[str] = opt(["conv1", "conv2", "conv3", "conv4", "conv5"],
                            "frozen layers probed (AlexNet conv1..conv5, ResNet layer1..layer4)")
    epochs: int = opt(30, "probe training epochs", check=AT_LEAST_ONE)
    lr: float = opt(0.01, "probe SGD learning rate", check=POSITIVE)
    batch_size: int = opt(256, "probe global batch", check=POSITIVE)
    momentum: float = opt(0.9, "probe SGD momentum", check=MOMENTUM)
    weight_decay: float = opt(5e-4, "probe SGD weight decay", check=NON_NEGATIVE)
    lr_decay_epochs: list[int] = opt([10, 20], "epochs where the probe lr is multiplied by lr_gamma")
    lr_gamma: float = opt(0.1, "probe lr decay factor", check=FRACTION)
    crop_scale: list[float] = opt([0.08, 1.0], "RandomResizedCrop area range of probe training images",
                                  check=SCALE_RANGE)
    batch_norm: bool = opt(True, "BatchNorm without affine before each linear layer")
    ten_crop: bool = opt(False, "score the last epoch with ten crops instead of the centre crop")
    after_train: bool = opt(False, "run the probes right after pretraining, in the same job")


@dataclass
class SlurmConfig:
    """Defaults for launch/slurm.py; its command-line flags win."""
    nodes: int = opt(1, "nodes", check=AT_LEAST_ONE)
    gpus_per_node: int = opt(0, "GPUs per node (one task each); 0 = a CPU job", check=NON_NEGATIVE)
    tasks_per_node: int = opt(1, "tasks per node of a CPU job (with GPUs: one per GPU)", check=AT_LEAST_ONE)
    cpus_per_task: int = opt(8, "CPUs per task", check=AT_LEAST_ONE)
    mem: str = opt("", "memory per node, e.g. 64G; \"\" = the partition's default")
    partition: str = opt("", "partition; \"\" = the cluster's default")
    time: int = opt(4320, "time limit in minutes (capped at the partition's)", check=AT_LEAST_ONE)
    account: str = opt("", "account to charge")
    qos: str = opt("", "quality of service")
    constraint: str = opt("", "node features (--constraint)")
    exclude: str = opt("", "nodes to avoid (--exclude)")
    job_name: str = opt("", "job name; \"\" = the run name")
    max_requeues: int = opt(20, "requeues after preemption or the time limit", check=NON_NEGATIVE)
    folder: str = opt("", "submitit logs; \"\" = <out_dir>/<name>/slurm")


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
    out_dir: str = opt("~/and_dist_runs", "where runs go: out_dir/name/<YYYYmmdd-HHMMSS>")
    name: str = opt("", "run name; \"\" = the config file's stem")
    run_dir: str = opt("", "an explicit run directory, used as given (the SLURM launcher sets it)")
    resume: str = opt("", "\"\" (fresh), auto (the latest run of this name, or run_dir), or a checkpoint path")
    init_from: str = opt("", "a new run from a run, checkpoint or weights file: its weights (and a run's bank and "
                         "round), this run's own config; resume=auto continues the branch itself once it has a checkpoint")


# ----- validation (runs before any work starts)

def validate(cfg: Config, check_data: bool = True) -> None:
    """Check types, choices, ranges, combinations, the data root (unless `check_data` is off:
    a launcher's dry run on a host without the data) and the resume path; raise ConfigError."""
    from .data.sources.layout import check_layout_keys        # reads label files: numpy and PIL, not at import
    check_fields(cfg)
    d, c = cfg.data, cfg.discovery
    try:                          # the owners' checks raise UserError: here each is a config error
        if check_data:
            check_root(d.source, d.root, d.download)
            check_layout_keys(d)
        check_pack_options(d)
        if d.loader != "cached" and d.source not in ("imagefolder", "images", "pack"):
            raise UserError(f"data.loader={d.loader} streams an ImageFolder tree, a folder of images or a pack "
                            f"(data.source=imagefolder, images or pack); data.source={d.source} is read into memory: use data.loader=cached")
        resolve_kernel(c.kernel, c.precision, c.backend, fused_runs=False if cfg.train.device == "cpu" else None)
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
    if cfg.init_from and cfg.resume not in ("", "auto"):
        raise ConfigError("init_from starts a new run, resume with a checkpoint path continues an old one: give one "
                          "(resume=auto continues an init_from run once it has a checkpoint of its own)")
    if cfg.init_from and not Path(cfg.init_from).expanduser().exists():
        raise ConfigError(f"init_from '{cfg.init_from}' does not exist (a run directory, a checkpoint directory "
                          "or a weights file)")
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


CODE_KEY = "code"


def load_config(config: str, overrides: list[str], base: Config | None = None, check_data: bool = True) -> Config:
    """`base` (default: the schema's defaults) <- YAML file `config` (path or name in configs/;
    "" for none) <- `a.b=value` overrides, validated (the data root only with `check_data`)."""
    cfg = Config() if base is None else base
    if config:
        path = find_config(config)
        data = yaml_load(path.read_text(), str(path))
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, "
                              f"got {describe_value(data)}")
        data.pop(CODE_KEY, None)      # a saved run's record of its code (save_config), not a setting
        merge(cfg, data)
    for text in overrides:
        apply_override(cfg, text)
    if config:
        cfg.name = cfg.name or path.stem
    cfg.out_dir = os.path.expanduser(cfg.out_dir)
    if cfg.data.root:  # relative to the launch directory; stored absolute so the run is portable
        cfg.data.root = os.path.abspath(os.path.expanduser(cfg.data.root))
    if cfg.init_from:    # as data.root: relative to the launch directory, stored absolute
        cfg.init_from = os.path.abspath(os.path.expanduser(cfg.init_from))
    from .data.sources.layout import find_file
    for key in ("classes", "val_labels", "val_ids"):   # absolute too (a shipped list: its path in configs/)
        setattr(cfg.data, key, find_file(getattr(cfg.data, key)))
    validate(cfg, check_data)
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
    from .run.entry import user_error_exit
    return user_error_exit(parse_args, argv)


MODEL_SHAPE = ("model.arch", "model.low_dim", "data.image_size")   # what weights and a bank are made for
MODEL_SHAPE_WORDS = "model.arch, model.low_dim and data.image_size"


def model_shape(cfg: Config) -> dict:
    """The MODEL_SHAPE keys' values."""
    return {key: getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) for key in MODEL_SHAPE}


def shape_differences(theirs: Config, ours: Config) -> list[tuple[str, object, object]]:
    """(key, theirs, ours) for each MODEL_SHAPE key where two configs differ: weights made under
    one do not fit the other (init_from, evaluate, compare's arms)."""
    a, b = model_shape(theirs), model_shape(ours)
    return [(key, a[key], b[key]) for key in MODEL_SHAPE if a[key] != b[key]]


def to_dict(cfg: Config) -> dict:
    return asdict(cfg)


def save_config(cfg: Config, path) -> None:
    """Write the resolved config as YAML (loadable again with load_config), with the code that
    wrote it under `code:` (platform/version.py; not a setting, load_config skips it)."""
    from .platform.version import code_version
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_text(path, yaml.safe_dump({**to_dict(cfg), CODE_KEY: code_version()}, sort_keys=False))


def config_from_dict(d: dict) -> Config:
    """A Config from a saved `to_dict` (a run's config.yaml or checkpoint), validated as types only."""
    cfg = Config()
    merge(cfg, d)
    check_fields(cfg)
    return cfg
