"""A copy of the code a SLURM submission runs, so that a queued or requeued job runs what was
submitted, not what the working tree holds when it starts (the editable install reads the tree).

submitit's RsyncSnapshot does this with rsync and a change of directory; rsync is not everywhere
and the job's working directory is the user's (relative paths in the config stay valid). Here the
package and its configs are copied into `FOLDER/code/<hash of their contents>` (one copy per
distinct code: resubmitting unchanged code reuses it), and job.py puts that folder first on the
job's sys.path and PYTHONPATH. Cleanup is the user's (docs/clusters.md)."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

PARTS = ("and_dist", "configs")      # what a job imports or reads: the package and configs/ beside it


def _files(root: Path) -> list[Path]:
    """The package's and configs' files, relative to root, without bytecode caches."""
    out = []
    for part in PARTS:
        for path in sorted((root / part).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                out.append(path.relative_to(root))
    return out


def take(root: Path, folder: Path) -> Path:
    """Copy root's package and configs into folder/code/<hash>; the snapshot's path."""
    files = {rel: (root / rel).read_bytes() for rel in _files(root)}    # read once: hashed = copied
    digest = hashlib.sha256()
    for rel, data in files.items():
        digest.update(str(rel).encode() + b"\0" + data + b"\0")
    target = folder / "code" / digest.hexdigest()[:16]
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
    for rel, data in files.items():
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).write_bytes(data)
    try:
        os.rename(staging, target)          # whole or not at all; a concurrent twin may win
    except OSError:
        shutil.rmtree(staging)
        if not target.is_dir():
            raise
    return target
