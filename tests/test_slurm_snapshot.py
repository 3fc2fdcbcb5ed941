"""Code snapshots for SLURM jobs (launch/snapshot.py, job.Stage): a job runs the code of its
submission. A copy of the checkout (a git repository of its own) submits a held job, its working
tree and HEAD then change, the job is released, and it must run and record the submitted code.
Without a cluster only the copy and the job's import order are checked."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_slurm import ENV, NO_CLUSTER, TINY, _tail, job_info, submitted, wait_job

REPO = Path(__file__).parent.parent
sys.path.append(str(REPO / "launch"))
import snapshot  # noqa: E402

EDIT = "\nraise SystemExit('the working tree of after the submission ran')\n"
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]


def checkout_copy(dst: Path) -> str:
    """The package, configs and launcher as a git repository of their own; its commit."""
    for part in ("and_dist", "configs", "launch"):
        shutil.copytree(REPO / part, dst / part, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([*GIT, "init", "-q", str(dst)], check=True)
    subprocess.run([*GIT, "-C", str(dst), "add", "-A"], check=True)
    subprocess.run([*GIT, "-C", str(dst), "commit", "-qm", "submitted"], check=True)
    return subprocess.run(["git", "-C", str(dst), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def edit_and_commit(root: Path) -> None:
    with open(root / "and_dist" / "train.py", "a") as f:
        f.write(EDIT)
    subprocess.run([*GIT, "-C", str(root), "commit", "-qam", "edited after submission"], check=True)


def test_a_snapshot_holds_the_package_and_configs_once_per_distinct_code(tmp_path):
    root = tmp_path / "checkout"
    shutil.copytree(REPO / "and_dist", root / "and_dist", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "configs", root / "configs")
    (root / "and_dist" / "__pycache__").mkdir()
    (root / "and_dist" / "__pycache__" / "train.cpython-311.pyc").write_bytes(b"stale bytecode")
    first = snapshot.take(root, tmp_path / "slurm")
    assert first.parent == tmp_path / "slurm" / "code"
    assert (first / "and_dist" / "train.py").read_bytes() == (root / "and_dist" / "train.py").read_bytes()
    assert (first / "configs" / "demo.yaml").is_file()
    assert not list(first.rglob("__pycache__")) and not list(first.rglob("*.pyc"))
    assert snapshot.take(root, tmp_path / "slurm") == first                  # unchanged code: reused
    (root / "and_dist" / "train.py").write_text((root / "and_dist" / "train.py").read_text() + EDIT)
    second = snapshot.take(root, tmp_path / "slurm")
    assert second != first and EDIT not in (first / "and_dist" / "train.py").read_text()
    assert sorted(p.name for p in (tmp_path / "slurm" / "code").iterdir()) == sorted([first.name, second.name])


@pytest.mark.slow
def test_a_job_imports_the_snapshot_before_its_working_directory_and_the_editable_install(tmp_path):
    """As submitit starts a task: `python -m`, working directory = an edited checkout that is also
    on PYTHONPATH, the venv's editable install pointing at yet another checkout."""
    root = tmp_path / "checkout"
    checkout_copy(root)
    code = snapshot.take(root, tmp_path / "slurm")
    edit_and_commit(root)
    version = json.dumps({"commit": "abc", "dirty": False})
    task = ("import sys, os; sys.path.append(sys.argv[1]); from job import Stage; "
            "Stage('train', '', (), '', code=sys.argv[2], version=sys.argv[3])._use_snapshot(); "
            "import and_dist.train, and_dist.platform.version as v; "
            "print(and_dist.train.__file__, os.environ['PYTHONPATH'].split(os.pathsep)[0], v.code_version())")
    # `python -c` puts the working directory first on sys.path, as `python -m submitit.core._submit` does
    proc = subprocess.run([sys.executable, "-c", task, str(REPO / "launch"), str(code), version], cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    said, printed = proc.stdout.splitlines()
    assert said == f"code: {code} (snapshot taken at submission)"
    where, first_path, version = printed.split(" ", 2)
    assert where == str(code / "and_dist" / "train.py") and first_path == str(code)
    assert "'commit': 'abc'" in version


@pytest.mark.slow
@pytest.mark.skipif(bool(NO_CLUSTER), reason=f"SLURM tests skipped: {NO_CLUSTER}")
def test_a_queued_job_runs_the_code_of_its_submission_not_the_edited_tree(tmp_path):
    root = tmp_path / "checkout"
    commit = checkout_copy(root)
    short = [o for o in TINY if not o.startswith(("curriculum.rounds", "train.epochs_per_round", "data.demo"))]
    # run from the copy: its launcher, its package (PYTHONPATH), the job's working directory
    proc = subprocess.run([sys.executable, "launch/slurm.py", "--config", "demo", *short, "curriculum.rounds=1",
                           "train.epochs_per_round=1", "data.demo_train=64", "data.demo_test=32",
                           f"out_dir={tmp_path / 'runs'}", "--cpus-per-task", "1", "--time", "5", "--sbatch", "hold"],
                          cwd=root, env={**ENV, "PYTHONPATH": str(root)}, text=True, capture_output=True, timeout=120)
    [(_, job, run, log)] = submitted(proc)
    try:
        assert job_info(job)["JobState"] == "PENDING"
        edit_and_commit(root)                          # the tree and HEAD move on while the job waits
        subprocess.run(["scontrol", "release", job], check=True, timeout=30)
        info = wait_job(job, log, timeout=120)
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)
    assert info["JobState"] == "COMPLETED", _tail(log)
    [code] = (tmp_path / "runs" / "demo" / "slurm" / "code").iterdir()
    assert f"code: {code} (snapshot taken at submission)" in log.read_text()
    for record in (yaml.safe_load((run / "config.yaml").read_text())["code"],
                   json.loads((run / "summary.json").read_text())["code"]):
        assert record["commit"] == commit and record["dirty"] is False, record
