"""The code a run was made with (git commit, dirty tree, package version), so every result a run
writes (config.yaml, summary.json, evaluation.json, the wandb config) traces back to its code.

A SLURM job runs a snapshot without `.git` (launch/slurm.py); the version read at submission
reaches it in AND_CODE_VERSION, which wins over asking git here."""
from __future__ import annotations

import functools
import json
import os
import subprocess
from importlib import metadata
from pathlib import Path

ENV = "AND_CODE_VERSION"
ROOT = Path(__file__).resolve().parents[2]       # the checkout holding the package


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def read_version() -> dict:
    """{"commit": sha or None (not a git checkout), "dirty": whether tracked files differ from
    the commit (untracked files do not count), "version": the installed package's version}."""
    try:
        version = metadata.version("and_dist")
    except metadata.PackageNotFoundError:
        version = None
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit.strip() if commit else None,
            "dirty": None if status is None else bool(status.strip()), "version": version}


@functools.cache
def code_version() -> dict:
    """This process's code version (AND_CODE_VERSION when set, else `read_version()`), read once."""
    if os.environ.get(ENV):
        return json.loads(os.environ[ENV])
    return read_version()


def describe_version(v: dict) -> str:
    """One line: `commit 1a2b3c4d5e6f (dirty), and_dist 0.1.0`."""
    where = "no git commit" if not v.get("commit") else \
        f"commit {v['commit'][:12]}" + (" (dirty)" if v.get("dirty") else "")
    return f"{where}, and_dist {v.get('version')}"
