"""Config loading: every user mistake must fail early with a one-line message naming the key."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from and_dist.run import rundir
from and_dist.config import (
    Config, ConfigError, config_or_exit, load_config, parse_args, save_config, to_dict,
    validate,
)

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path, text, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error(config, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(config, list(overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


# ----- resolution and defaults

@pytest.mark.parametrize("name", ["demo", "demo.yaml", str(REPO / "configs" / "demo.yaml")])
def test_bare_name_and_path_resolve(name):
    cfg = load_config(name, [])
    assert cfg.data.source == "demo" and cfg.model.arch == "convnet_small"
    written = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["train"]
    assert cfg.train.epochs_per_round == written["epochs_per_round"] and cfg.train.schedule == "cosine"
    assert cfg.name == "demo"
    assert cfg.train.weight_decay == 5e-4  # untouched default survives


def test_missing_config_lists_available():
    message = error("no_such_config")
    assert "no_such_config" in message and "demo" in message


def test_all_shipped_configs_parse():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        # datasets are not here: everything but the data root is validated
        cfg = load_config(str(path), [], check_data=False)
        assert cfg.name == path.stem


def test_name_and_out_dir(tmp_path):
    cfg = load_config("demo", ["name=run1", "out_dir=~/somewhere"])
    assert cfg.out_dir == os.path.expanduser("~/somewhere")
    run, resuming = rundir.choose(cfg.out_dir, cfg.name, cfg.run_dir, cfg.resume)
    assert run.parent == Path(os.path.expanduser("~/somewhere")) / "run1" and not resuming
    run.rmdir()
    assert "name" in error("demo", ["name=a/b"])


# ----- overrides

def test_override_value_parsing():
    cfg = load_config("demo", [
        "train.nesterov=false", "train.batch_size=64", "train.lr=0.1", "train.weight_decay=1e-4",
        "data.crop_scale=[0.5,1]", "train.seed=7", "name=2024", "log.wandb_entity=",
    ])
    assert cfg.train.nesterov is False
    assert cfg.train.batch_size == 64 and type(cfg.train.batch_size) is int
    assert cfg.train.lr == 0.1
    assert cfg.train.weight_decay == 1e-4 and type(cfg.train.weight_decay) is float
    assert cfg.data.crop_scale == [0.5, 1.0] and all(type(v) is float for v in cfg.data.crop_scale)
    assert cfg.train.seed == 7
    assert cfg.name == "2024"  # str fields keep the text
    assert cfg.log.wandb_entity == ""


def test_int_accepted_for_float():
    cfg = load_config("demo", ["train.lr=1"])
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float


def test_override_section_mapping_merges():
    cfg = load_config("demo", ["train={lr: 0.2, seed: 3}"])
    assert (cfg.train.lr, cfg.train.seed, cfg.train.batch_size) == (0.2, 3, 128)


def test_unknown_key_in_override_suggests():
    message = error("demo", ["train.epochs_per_rnd=3"])
    assert message == ("unknown config key 'train.epochs_per_rnd'; "
                       "did you mean 'train.epochs_per_round'?")


def test_unknown_key_without_close_match_lists_section():
    message = error("demo", ["train.zzzzzz=1"])
    assert "'train.zzzzzz'" in message and "epochs_per_round" in message and "batch_size" in message


def test_key_missing_its_section_suggests_full_path():
    assert "did you mean 'train.batch_size'" in error("demo", ["batch_size=3"])


@pytest.mark.parametrize("override, expected", [
    ("nokey", "must look like key=value"),
    ("train.lr.x=1", "'train.lr' is a value, not a section"),
    ("train=3", "'train' is a section"),
    ("train.lr=[1,", "cannot parse override"),
])
def test_malformed_overrides(override, expected):
    assert expected in error("demo", [override])


# ----- YAML errors

def test_unknown_key_in_yaml_nested(tmp_path):
    path = write(tmp_path, "train:\n  epochs_per_rnd: 3\n")
    assert error(path) == ("unknown config key 'train.epochs_per_rnd'; "
                           "did you mean 'train.epochs_per_round'?")


def test_unknown_section_in_yaml(tmp_path):
    path = write(tmp_path, "trian:\n  lr: 0.1\n")
    assert "unknown config key 'trian'; did you mean 'train'?" == error(path)


def test_yaml_not_a_mapping_and_bad_syntax(tmp_path):
    assert "mapping" in error(write(tmp_path, "- 1\n- 2\n"))
    assert "cannot parse" in error(write(tmp_path, "train: [1,\n", "bad.yaml"))


def test_empty_yaml_means_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "# nothing\n"), [])
    assert cfg == Config(name="exp", out_dir=os.path.expanduser("~/and_dist_runs"))


# ----- types, choices, ranges

@pytest.mark.parametrize("override, expected", [
    ("train.batch_size=abc", "config key 'train.batch_size' expects int, got str 'abc'"),
    ("train.batch_size=true", "config key 'train.batch_size' expects int, got bool True"),
    ("train.batch_size=2.5", "config key 'train.batch_size' expects int, got float 2.5"),
    ("train.lr=null", "config key 'train.lr' expects float, got null"),
    ("train.nesterov=1", "config key 'train.nesterov' expects bool, got int 1"),
    ("data.crop_scale=0.5", "config key 'data.crop_scale' expects list[float], got float 0.5"),
    ("data.crop_scale=[0.2,x]", "config key 'data.crop_scale[1]' expects float, got str 'x'"),
    ("data.root=null", "config key 'data.root' expects str, got null"),
])
def test_wrong_type(override, expected):
    assert error("demo", [override]) == expected


def test_wrong_type_in_yaml(tmp_path):
    path = write(tmp_path, "train:\n  batch_size: abc\n")
    assert error(path) == "config key 'train.batch_size' expects int, got str 'abc'"


def test_bad_choice():
    assert error("demo", ["discovery.backend=fais"]) == \
        "config key 'discovery.backend' must be one of torch, faiss; got 'fais'"


@pytest.mark.parametrize("override, expected", [
    ("train.batch_size=0", "'train.batch_size' must be > 0"),
    ("bank.momentum=1", "'bank.momentum' must be in [0, 1)"),
    ("curriculum.anchor_rate=0", "'curriculum.anchor_rate' must be in (0, 1]"),
    ("curriculum.anchor_rate=1.5", "'curriculum.anchor_rate' must be in (0, 1]"),
    ("curriculum.rounds=0", "'curriculum.rounds' must be >= 1"),
    ("data.crop_scale=[0.5,0.2]", "'data.crop_scale' must be [min, max]"),
    ("data.grayscale_p=2", "'data.grayscale_p' must be in [0, 1]"),
])
def test_range_checks(override, expected):
    assert expected in error("demo", [override])


def test_validate_catches_programmatic_mistakes():
    cfg = Config(name="x")
    cfg.train.batch_size = "64"
    with pytest.raises(ConfigError, match="expects int"):
        validate(cfg)


def test_resume_path_must_exist(tmp_path):
    assert "does not exist" in error("demo", [f"resume={tmp_path}/nope.pt"])
    assert load_config("demo", ["resume=auto"]).resume == "auto"


# ----- data root checks

def test_imagefolder_missing_root(tmp_path):
    assert error("demo", ["data.source=imagefolder"]).startswith("data.root is empty")
    message = error("demo", ["data.source=imagefolder", f"data.root={tmp_path}"])
    assert message == (f"data.root '{tmp_path}' has no train/ and test/ folders "
                       "(expected an ImageFolder tree for data.source=imagefolder)")
    assert "is not an existing folder" in error(
        "demo", ["data.source=imagefolder", f"data.root={tmp_path}/absent"])


def test_imagefolder_relative_root_resolved_against_cwd(tmp_path, monkeypatch):
    (tmp_path / "set" / "train").mkdir(parents=True)
    (tmp_path / "set" / "test").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = load_config("demo", ["data.source=imagefolder", "data.root=set"])
    assert cfg.data.root == str(tmp_path / "set")


def test_cifar10_missing_root(tmp_path):
    message = error("demo", ["data.source=cifar10"])
    assert message.startswith("data.root is empty; data.source=cifar10 needs")
    assert "cifar-10-batches-py" in message and "data.download=true" in message
    message = error("demo", ["data.source=cifar10", f"data.root={tmp_path}"])
    assert "has no cifar-10-batches-py/ folder" in message
    (tmp_path / "cifar-10-batches-py").mkdir()
    assert load_config("demo", ["data.source=cifar10", f"data.root={tmp_path}"])


def test_download_skips_root_check(tmp_path):
    cfg = load_config("demo", ["data.source=cifar100", "data.download=true",
                               f"data.root={tmp_path}/new"])
    assert cfg.data.download
    assert "download into" in error("demo", ["data.source=svhn", "data.download=true"])


def test_svhn_needs_mat_files(tmp_path):
    (tmp_path / "train_32x32.mat").write_bytes(b"")
    message = error("demo", ["data.source=svhn", f"data.root={tmp_path}"])
    assert "has no test_32x32.mat file" in message


# ----- saving, command line

def test_saved_config_round_trips(tmp_path):
    cfg = load_config("demo", ["train.lr=0.5", "train.weight_decay=1e-5", "data.crop_scale=[0.3,0.9]",
                               "name=rt", f"out_dir={tmp_path}"])
    path = tmp_path / "rt" / "config.yaml"
    save_config(cfg, path)
    again = load_config(str(path), [])
    assert again == cfg
    assert to_dict(again) == to_dict(cfg)


def test_parse_args():
    cfg = parse_args(["train.lr=0.2", "--config", "demo", "train.seed=5"])
    assert (cfg.train.lr, cfg.train.seed, cfg.name) == (0.2, 5, "demo")
    assert parse_args([]).name == "demo"


@pytest.mark.slow
def test_config_or_exit_subprocess():
    code = ("from and_dist.config import config_or_exit; "
            "config_or_exit(['--config','demo','train.batch_sise=3'])")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "'train.batch_size'" in lines[0]
    assert "Traceback" not in result.stderr


def test_config_or_exit_in_process(capsys):
    with pytest.raises(SystemExit) as info:
        config_or_exit(["discovery.backend=fais"])
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("error: config key 'discovery.backend'")


def test_large_images_are_refused_by_the_in_memory_loader():
    with pytest.raises(ConfigError, match="DALI"):
        load_config("imagenet_alexnet", ["data.source=demo", "data.loader=cached"])


def test_the_key_reference_is_the_schema_and_the_layout_is_the_tree():
    """docs/config.md's key table is generated from the schema's helps, every field has a help;
    docs/design.md's layout block is what tools/docs.py prints from the tree as it is."""
    from dataclasses import fields, is_dataclass

    def missing(obj, prefix=""):
        for f in fields(obj):
            value = getattr(obj, f.name)
            yield from missing(value, f"{prefix}{f.name}.") if is_dataclass(value) else \
                ([prefix + f.name] if not f.metadata.get("help") else [])

    assert list(missing(Config())) == []
    sys.path.insert(0, str(REPO / "tools"))
    from docs import WRITE, regenerate
    for page in ("config.md", "design.md"):
        doc = (REPO / "docs" / page).read_text()
        assert regenerate(doc) == doc, f"docs/{page} is stale: {WRITE}"


@pytest.mark.parametrize("overrides, words", [
    (["discovery.kernel=fused", "discovery.backend=faiss"], "finds neighbours itself"),
    (["discovery.precision=bf16x3", "discovery.kernel=exact"], "bf16x3 is the fused kernel's"),
    (["discovery.precision=bf16x3", "discovery.backend=faiss"], "bf16x3 is the fused kernel's"),
    (["discovery.kernel=fused", "train.device=cpu"], "needs a CUDA device"),
    (["data.loader=torch"], "streams an ImageFolder tree"),
])
def test_invalid_combinations_fail_in_validation(overrides, words):
    with pytest.raises(ConfigError, match=words):
        load_config("demo", overrides)
