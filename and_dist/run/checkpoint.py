"""Checkpoints of named state owners, loadable at any world size, verified before use.

An owner is anything with `state_dict()` / `load_state_dict()`. A checkpoint is a directory:
`state.pt` holds every replicated owner's state (written by rank 0); an owner marked `sharded`
(the memory bank) is saved by every rank as `<name>-<rank>.pt` and, on loading, is handed all the
saved parts so it can take what falls in its own range. `manifest.json`, written last, lists every
file with its size and checksum, the world size and the step.

Publishing: every file is fsynced, then the manifest, then the directory; the temporary
`.tmp-<name>` is renamed to `<name>`, the root fsynced, and `latest` replaced the same way. A
crash or a failed write at any point leaves `latest` naming the previous, complete checkpoint;
whatever a failed save left behind starts with a dot and is removed by the next start.

Finding one to resume: the checkpoint `latest` names, then the others newest first; the first
whose manifest matches its files is used, and each damaged one skipped is named in one line.
This module knows nothing of any one owner.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from ..platform import dist, files
from ..platform.errors import UserError

LATEST = "latest"
STATE = "state.pt"
MANIFEST = "manifest.json"


class Damaged(Exception):
    """A checkpoint whose files do not match its manifest: '<file>: <what is wrong>'."""


class SaveFailed(OSError):
    """A save that published nothing; the message names each failed path and its error."""
    one_line = True


# ------------------------------------------------------------------------------------ saving

def _step(owners: dict) -> int | None:
    return next((int(o.global_step) for o in owners.values() if hasattr(o, "global_step")), None)


def _fail(errors: list[str], ckpt_root: Path) -> SaveFailed:
    latest = ckpt_root / LATEST
    kept = latest.read_text().strip() if latest.exists() else "none"
    return SaveFailed(f"checkpoint not saved ({'; '.join(errors)}); latest is still {kept}")


def save(ckpt_root: Path, name: str, owners: dict, keep: int = 2) -> Path:
    """Collective: every rank writes its sharded owners, rank 0 the rest, then publishes.
    Raises SaveFailed on every rank when any rank's write failed."""
    rank, world = dist.rank_world()
    final, tmp = ckpt_root / name, ckpt_root / f".tmp-{name}"
    error = None
    if rank == 0:
        try:
            remove_partial(ckpt_root)
            tmp.mkdir(parents=True)
        except OSError as e:
            error = str(files.WriteError(tmp, e))
    error = dist.broadcast_object(error, op="checkpoint save (start)")
    if error:
        raise _fail([error], ckpt_root)
    written, error = {}, None
    try:
        replicated = {}
        for key, owner in owners.items():
            if getattr(owner, "sharded", False):
                part = f"{key}-{rank}.pt"
                written[part] = files.write_durable(tmp / part, lambda f, o=owner: torch.save(o.state_dict(), f))
            elif rank == 0:
                replicated[key] = owner.state_dict()
        if rank == 0:
            written[STATE] = files.write_durable(tmp / STATE, lambda f: torch.save(replicated, f))
    except files.WriteError as e:
        error = f"rank {rank}: {e}" if world > 1 else str(e)
    _test_pause()
    reports = dist.all_gather_object((written, error), op="checkpoint save (files)")
    errors = [e for _, e in reports if e]
    if not errors and rank == 0:
        listing = {k: v for w, _ in reports for k, v in w.items()}
        error = _publish(ckpt_root, name, tmp, {"name": name, "step": _step(owners), "world": world,
                                                "checksum": files.CHECKSUM, "files": listing})
        if error is None:
            _prune(ckpt_root, keep)
    if errors and rank == 0:
        files.remove_tree(tmp)
    error = dist.broadcast_object(error, op="checkpoint save (publish)")
    errors += [error] if error else []
    if errors:
        raise _fail(errors, ckpt_root)
    return final


def _test_pause() -> None:
    """Test hook: AND_TEST_SLOW_SAVE=seconds holds every save after its files are written and
    before it is published, so a test's kill lands inside a checkpoint write."""
    delay = float(os.environ.get("AND_TEST_SLOW_SAVE", "0") or 0)
    if delay:
        time.sleep(delay)


def _publish(ckpt_root: Path, name: str, tmp: Path, manifest: dict) -> str | None:
    """Rank 0: manifest, rename, `latest`; on a failure undo to the previous state and return it."""
    final, old = ckpt_root / name, ckpt_root / f".old-{name}"
    moved = renamed = False
    try:
        files.write_durable(tmp / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        files.fsync_dir(tmp)
        if final.exists():                 # a re-save of the same step: keep it until replaced
            os.replace(final, old)
            moved = True
        os.replace(tmp, final)
        renamed = True
        files.fsync_dir(ckpt_root)
        files.write_text(ckpt_root / LATEST, name)
    except OSError as e:
        if renamed:
            files.remove_tree(final)
        if moved:
            os.replace(old, final)
        files.remove_tree(tmp)
        return str(e if isinstance(e, files.WriteError) else files.WriteError(final, e))
    files.remove_tree(old)
    return None


def _prune(ckpt_root: Path, keep: int) -> None:
    """Keep the `keep` newest checkpoints (by modification time) and the one `latest` names."""
    latest = (ckpt_root / LATEST).read_text().strip()
    for d in _candidates(ckpt_root)[max(keep, 1):]:
        if d.name != latest:
            files.remove_tree(d)


# ---------------------------------------------------------------------------------- checking

def verify(path: Path) -> dict:
    """The manifest of checkpoint `path` once every file it lists has its size and checksum;
    raises Damaged naming the first file that does not."""
    mf = path / MANIFEST
    try:
        manifest = json.loads(mf.read_text())
        listing = manifest["files"]
    except FileNotFoundError:
        raise Damaged(f"{mf}: missing") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise Damaged(f"{mf}: unreadable ({e})") from None
    for fname, want in listing.items():
        f = path / fname
        try:
            size, digest = files.checksum(f)
        except FileNotFoundError:
            raise Damaged(f"{f}: missing") from None
        except OSError as e:
            raise Damaged(f"{f}: unreadable ({e.strerror or e})") from None
        if size != want["size"]:
            raise Damaged(f"{f}: {size} bytes, the manifest says {want['size']}")
        if digest != want.get(manifest.get("checksum", files.CHECKSUM)):
            raise Damaged(f"{f}: checksum mismatch")
    return manifest


def _candidates(ckpt_root: Path) -> list[Path]:
    """Checkpoint directories (named by `latest`, or holding a manifest or a state.pt), the one
    `latest` names first, then newest first."""
    if not ckpt_root.is_dir():
        return []
    try:
        named = (ckpt_root / LATEST).read_text().strip()
    except OSError:
        named = ""
    dirs = sorted((d for d in ckpt_root.iterdir() if d.is_dir() and not d.name.startswith(".") and
                   (d.name == named or (d / MANIFEST).exists() or (d / STATE).exists())),
                  key=lambda d: d.stat().st_mtime, reverse=True)
    return sorted(dirs, key=lambda d: d.name != named)


def _manifest_step(path: Path) -> int | None:
    try:
        return json.loads((path / MANIFEST).read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None


def remove_partial(ckpt_root: Path) -> list[str]:
    """Remove what interrupted saves left (dot-named entries); returns their names."""
    gone = []
    if ckpt_root.is_dir():
        for entry in ckpt_root.iterdir():
            if entry.name.startswith("."):
                files.remove_tree(entry) if entry.is_dir() else entry.unlink(missing_ok=True)
                gone.append(entry.name)
    return gone


def newest_intact(ckpt_root: Path) -> tuple[Path | None, dict | None, dict[Path, str]]:
    """(the newest intact checkpoint, its manifest, what is wrong with each newer one)."""
    damaged = {}
    for d in _candidates(ckpt_root):
        try:
            return d, verify(d), damaged
        except Damaged as e:
            damaged[d] = str(e)
    return None, None, damaged


def find_latest(ckpt_root: Path, clean: bool = False) -> Path | None:
    """The checkpoint to resume from, None when there is none; a damaged newest one is skipped
    with one line on stderr, and none intact among several is a UserError. `clean` (the run's
    lock holder) also removes what interrupted saves left."""
    if clean:
        for name in remove_partial(ckpt_root):
            print(f"removed {ckpt_root / name}, left by an interrupted save", file=sys.stderr)
    path, manifest, damaged = newest_intact(ckpt_root)
    what = "; ".join(damaged.values())
    if damaged and path is None:
        raise UserError(f"no intact checkpoint in {ckpt_root}: {what}; restore the files or start a fresh run")
    if damaged:
        steps = [s for s in map(_manifest_step, damaged) if s is not None]
        here = manifest.get("step")
        rerun = (f"re-running {max(steps) - here} steps" if steps and here is not None
                 else "re-running the steps after it")
        print(f"warning: skipped damaged checkpoint ({what}); resuming from {path} "
              f"(step {here}), {rerun}", file=sys.stderr)
    return path


def resolve(path: Path) -> Path:
    """A verified checkpoint directory from itself, its `checkpoints/` folder or its run
    directory; a damaged checkpoint given by name is a UserError naming the newest intact one."""
    path = Path(path).expanduser()
    for candidate in (path, path / "checkpoints"):
        if (candidate / MANIFEST).exists() or (candidate / STATE).exists():
            try:
                verify(candidate)
                return candidate
            except Damaged as e:
                intact = newest_intact(candidate.parent)[0]
                other = f"the newest intact one is {intact}" if intact else "no intact checkpoint is beside it"
                raise UserError(f"checkpoint {candidate} is damaged ({e}); {other}") from None
        latest = find_latest(candidate)
        if latest is not None:
            return latest
    raise FileNotFoundError(f"no checkpoint at {path} (expected a checkpoint directory or a run directory)")


# ---------------------------------------------------------------------------------- loading

def read_state(path: Path) -> dict:
    """The replicated owners' states of a checkpoint, by owner name."""
    return torch.load(path / STATE, map_location="cpu", weights_only=True)


def sharded_parts(path: Path, key: str) -> list[Path]:
    """The files sharded owner `key` saved in checkpoint `path` (one per rank), as its manifest lists them."""
    listed = json.loads((path / MANIFEST).read_text())["files"]
    return [path / n for n in sorted(listed) if n.startswith(f"{key}-") and n.endswith(".pt")]


def load(path: Path, owners: dict, state: dict | None = None) -> None:
    """Restore every owner that the checkpoint holds; owners it lacks keep their state. The
    sharded parts are the ones its manifest lists (`resolve`/`find_latest` verified them).
    `state`: the replicated states, when the caller has read them already (contents.RunState)."""
    state = read_state(path) if state is None else state
    for key, owner in owners.items():
        if getattr(owner, "sharded", False):
            parts = (torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in sharded_parts(path, key))
            owner.load_state_dict(parts)
        elif key in state:
            owner.load_state_dict(state[key])
