"""Durable, atomic file writes: a reader never sees a half-written file, and a file that was
published (renamed into place) survives a node crash: its data is fsynced before the rename and
the directory after it. A write that fails (ENOSPC, EDQUOT, EIO, a read-only file system) raises
`WriteError` naming the path, and leaves no temporary file behind."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import xxhash

CHECKSUM = "xxh3_64"         # ~10 GB/s on one core; xxhash comes with wandb
HASH = xxhash.xxh3_64        # benchmarks/checkpoint_save.py swaps it to time a save without it


class WriteError(OSError):
    """A failed write, as one line: the path and the system's error."""
    one_line = True

    def __init__(self, path, err: OSError):
        super().__init__(err.errno, f"cannot write {path}: {err.strerror or err}")
        self.path = str(path)

    def __str__(self) -> str:
        return self.strerror


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Sink:
    """A file that checksums and counts what passes through it, and keeps the first OSError
    (torch.save turns it into an errno-less RuntimeError)."""

    def __init__(self, f):
        self.f, self.hash, self.size, self.error = f, HASH(), 0, None

    def write(self, data) -> int:
        try:
            n = self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise
        self.hash.update(data)
        self.size += memoryview(data).nbytes
        return n

    def flush(self) -> None:
        self.f.flush()


def write_durable(path: str | os.PathLike, fill) -> dict:
    """Write `path` in place with `fill(file)` (for a file not yet visible to anyone, e.g. inside
    a temporary directory), fsync it; returns {"size", CHECKSUM}. Raises WriteError."""
    path = Path(path)
    try:
        with open(path, "wb") as f:
            sink = _Sink(f)
            try:
                if os.environ.get("AND_TEST_SIGNAL_AT"):          # test hook: a stop inside this write
                    from ..run.stop import test_signal
                    test_signal(f"write:{path.name}")
                fill(sink)
            except Exception as e:  # noqa: BLE001 - the sink knows the real OSError
                if sink.error is not None:
                    raise sink.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        path.unlink(missing_ok=True)
        raise WriteError(path, e) from None
    except BaseException:                     # a stop signal (stop.Stopped) or a bug: no half file
        path.unlink(missing_ok=True)
        raise
    return {"size": sink.size, CHECKSUM: sink.hash.hexdigest()}


def _publish(path: Path, fill) -> dict:
    """Write a temporary sibling durably, rename it over `path`, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    record = write_durable(tmp, fill)
    try:
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WriteError(path, e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return record


def write_bytes(path: str | os.PathLike, data: bytes) -> dict:
    return _publish(Path(path), lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str) -> dict:
    return write_bytes(path, text.encode())


def torch_save(obj, path: str | os.PathLike) -> dict:
    import torch          # here, not at import: the config and the launcher write files without torch
    return _publish(Path(path), lambda f: torch.save(obj, f))


def checksum(path: str | os.PathLike, block: int = 1 << 24) -> tuple[int, str]:
    """(size, checksum) of a file as written by `write_durable`."""
    h, size = HASH(), 0
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def remove_tree(path: str | os.PathLike) -> None:
    shutil.rmtree(path, ignore_errors=True)
