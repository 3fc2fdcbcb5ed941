"""Helpers the test modules share (pytest puts this folder on sys.path)."""
import io
import json
import os
import random
import socket
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HOME": "/tmp"}   # for subprocess runs
WORKERS = TESTS / "workers"          # scripts the multi-process tests start under torchrun


def free_port() -> int:
    """A TCP port nobody listens on now, for a torchrun rendezvous: from 10000-14999, below both
    Linux's ephemeral ports (no other process is handed one by chance) and the SLURM jobs'
    (cluster.py: 15000 + job id), and under pytest-xdist (make test runs two workers) from a block
    of its own per worker, so two workers never pick the same port for rendezvous started at once."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    span = 5000 // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    block = range(10000 + worker * span, 10000 + (worker + 1) * span)
    for port in random.sample(block, len(block)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {block}")


def jpeg(rng, cls: int, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    """A smooth image whose dominant colour is its class's, of a random ImageNet-like shape."""
    h, w = int(rng.integers(48, 121)), int(rng.integers(48, 121))
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.eye(3)[cls] * 160 + 40
    img = base[None, None] + 60 * np.stack([np.sin(6 * xx + cls), np.cos(5 * yy), np.sin(4 * (xx + yy))], -1)
    img = img + rng.normal(0, 8, img.shape)
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).convert(mode).save(buf, fmt)
    return buf.getvalue()


def events(run: Path, kind: str) -> list[dict]:
    """The run's metrics.jsonl events of one kind (none if it has no file yet)."""
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def final_bank(run: Path) -> torch.Tensor:
    """The whole memory bank of the run's latest checkpoint, shards joined in index order."""
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    parts = sorted((torch.load(f, weights_only=True) for f in ckpt.glob("bank-*.pt")), key=lambda p: p["lo"])
    return torch.cat([p["rows"] for p in parts])


def wandb_records(run: Path) -> list:
    """The protobuf records of the newest offline wandb run, read from its .wandb file (LevelDB-style
    log: 32 KiB blocks, 7-byte chunk headers)."""
    from wandb.proto import wandb_internal_pb2 as pb
    newest = max((run / "wandb").glob("offline-run-*"), key=lambda d: d.name)
    data = next(newest.glob("*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    records, pos, buf = [], 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (kind == 0 and n == 0):
            pos += left
            continue
        buf, pos = buf + data[pos + 7: pos + 7 + n], pos + 7 + n
        if kind in (1, 4):              # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            records.append(record)
    return records


def wandb_history(run: Path) -> list[dict]:
    """History rows of the newest offline wandb run."""
    return [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in wandb_records(run) if r.HasField("history")]


def wandb_config(run: Path) -> dict:
    """The config the newest offline wandb run was started with."""
    (r,) = [r for r in wandb_records(run) if r.HasField("run")]
    return {i.key: json.loads(i.value_json) for i in r.run.config.update}


def main_here(capsys, main, *args: str):
    """An entry point's `main(args)` in this process, as a CompletedProcess (returncode = what main
    returned): for checks of what it says, without an interpreter start. Subprocess tests hold the
    exit-status contract (one per entry point). Restores the torch thread count it may set."""
    import subprocess
    threads = torch.get_num_threads()
    try:
        status = main(list(args))
    except SystemExit as e:                   # config errors leave through sys.exit, as from a shell
        status = e.code if isinstance(e.code, int) else 1
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), status, out, err)


def train_here(config: str, overrides: list[str]):
    """(run directory, trainer, summary) of a run trained in this process, built as `train`
    builds it: for checks of what a run did without an interpreter start."""
    from and_dist.config import load_config
    from and_dist.platform import dist
    from and_dist.run import rundir
    from and_dist.run.stop import Stop
    from and_dist.train import build_trainer
    cfg = load_config(config, overrides)
    run, _ = rundir.choose(cfg.out_dir, cfg.name, cfg.run_dir, "")
    with Stop() as stop:
        trainer = build_trainer(cfg, dist.init("cpu"), run, None, stop)
        try:
            summary = trainer.run()
        finally:
            trainer.log.close()
    return run, trainer, summary
