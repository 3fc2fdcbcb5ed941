"""The code version (commit, dirty tree, package version) in everything a run writes: config.yaml,
summary.json, evaluation.json, the wandb config, the banner, and compare's table."""
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from helpers import ENV, wandb_config

from and_dist.compare import code_lines, run_code
from and_dist.config import load_config
from and_dist.platform import version
from and_dist.run import rundir

REPO = Path(__file__).parent.parent
RUN_ENV = {**ENV, "CUDA_VISIBLE_DEVICES": ""}
TINY = ["--config", "demo", "data.demo_train=100", "data.demo_test=50", "curriculum.rounds=1",
        "train.epochs_per_round=1", "eval.knn_k=5", "train.threads=1", "log.every_steps=1"]


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, text=True).stdout


def expected() -> dict:
    """The checkout's version as git itself reports it now."""
    return {"commit": git(REPO, "rev-parse", "HEAD").strip(),
            "dirty": bool(git(REPO, "status", "--porcelain", "--untracked-files=no").strip()),
            "version": metadata.version("and_dist")}


@pytest.mark.slow
def test_read_names_the_commit_and_a_changed_tracked_file(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.setattr(version, "ROOT", repo)
    assert version.read_version()["commit"] is None and version.read_version()["dirty"] is None     # not a checkout
    git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    git(repo, "add", "a.py")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    sha = git(repo, "rev-parse", "HEAD").strip()
    assert version.read_version() == {"commit": sha, "dirty": False, "version": metadata.version("and_dist")}
    (repo / "new.txt").write_text("untracked\n")           # run outputs beside the code: not dirty
    assert version.read_version()["dirty"] is False
    (repo / "a.py").write_text("x = 2\n")
    assert version.read_version()["dirty"] is True
    assert version.describe_version(version.read_version()) == f"commit {sha[:12]} (dirty), and_dist {metadata.version('and_dist')}"


@pytest.mark.slow
def test_every_record_of_a_run_names_its_code(tmp_path):
    want = expected()
    proc = subprocess.run([sys.executable, "-m", "and_dist.train", *TINY, f"out_dir={tmp_path}", "name=v",
                           "log.wandb_mode=offline"], cwd=REPO, env=RUN_ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run,) = rundir.runs_of(tmp_path / "v")
    assert f"code {version.describe_version(want)}" in proc.stdout
    assert yaml.safe_load((run / "config.yaml").read_text())["code"] == want
    assert load_config(str(run / "config.yaml"), []).curriculum.rounds == 1     # still a loadable config
    assert json.loads((run / "summary.json").read_text())["code"] == want
    assert wandb_config(run)["code"] == want

    # evaluation.json; a snapshot without .git (a SLURM job) takes the version from AND_CODE_VERSION
    given = {"commit": "f" * 40, "dirty": False, "version": "9.9"}
    for env, code in ((RUN_ENV, want), ({**RUN_ENV, version.ENV: json.dumps(given)}, given)):
        proc = subprocess.run([sys.executable, "-m", "and_dist.evaluate", "knn", "--checkpoint", str(run),
                               "eval.knn_k=5", "log.wandb_mode=disabled"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        newest = rundir.runs_of(run / "evaluations")[-1]
        assert json.loads((newest / "evaluation.json").read_text())["code"] == code
        assert yaml.safe_load((newest / "config.yaml").read_text())["code"] == code


@pytest.mark.slow
def test_compare_shows_the_code_of_its_runs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "and_dist.compare", "--arms", "and,instance", "--seeds", "0",
                           *TINY, "curriculum.rounds=2", f"out_dir={tmp_path}", "name=c", "log.progress=false",
                           "log.wandb_mode=disabled"],
                          cwd=REPO, env=RUN_ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = f"Code: {version.describe_version(expected())} (every run)."
    assert line in proc.stdout and line in (tmp_path / "c" / "compare.md").read_text()
    runs = json.loads((tmp_path / "c" / "compare.json").read_text())["runs"]
    assert [r["code"] for r in runs] == [expected()] * 3


def test_compare_lists_each_code_version_with_its_runs(tmp_path):
    a, b = {"commit": "a" * 40, "dirty": False, "version": "0.1.0"}, {"commit": "b" * 40, "dirty": True, "version": "0.1.0"}
    (tmp_path / "summary.json").write_text(json.dumps({"rounds": [], "code": b}))
    assert run_code(tmp_path) == b
    runs = [{"seed": 0, "arm": "base", "code": a}, {"seed": 0, "arm": "and", "code": b},
            {"seed": 1, "arm": "and", "code": None}]
    assert code_lines(runs).splitlines()[1:] == ["Code differs between runs:",
                                                 "- commit aaaaaaaaaaaa, and_dist 0.1.0: seed0/base",
                                                 "- commit bbbbbbbbbbbb (dirty), and_dist 0.1.0: seed0/and",
                                                 "- not recorded: seed1/and"]
