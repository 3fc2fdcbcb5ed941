"""The CUDA path end to end, on a GPU machine (skipped elsewhere): a small demo run trains with
bf16 autocast, the attention bank kernel, fused discovery, the compiled colour jitter and batches
prefetched on a side stream; a SIGTERM mid-run saves, and the resumed run finishes; with two GPUs,
the same over NCCL. The rest of the suite keeps its runs on the CPU (conftest.py)."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).parent.parent
GPUS = os.environ.get("AND_TEST_GPUS", "")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TINY = ["--config", "demo", "train.device=cuda", "data.demo_train=2000", "data.demo_test=200",
        "curriculum.rounds=2", "train.epochs_per_round=2", "train.batch_size=128", "eval.knn_k=10",
        "log.progress=false", "log.wandb_mode=disabled"]


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if GPUS in ("", "all"):
        env.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        env["CUDA_VISIBLE_DEVICES"] = GPUS
    return env


def _cmd(ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", "and_dist.train"]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
            f"--master_port={29000 + os.getpid() % 900}", "-m", "and_dist.train"]


def _check_finished(run: Path, out: str) -> None:
    assert "device cuda" in out, out[:2000]
    assert "running it eagerly" not in out                      # the jitter compiled
    summary = json.loads((run / "summary.json").read_text())
    assert 0.0 < summary["final_knn_top1"] <= 100.0
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in epochs if e["event"] == "epoch"]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_demo_run_trains_stops_and_resumes_on_cuda(tmp_path, ranks):
    if ranks > torch.cuda.device_count():
        pytest.skip(f"needs {ranks} GPUs")
    run = tmp_path / "run"
    args = [*_cmd(ranks), *TINY, f"run_dir={run}"]
    proc = subprocess.Popen(args, cwd=REPO, env=_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first, deadline = run / "checkpoints" / "latest", time.time() + 600
    while not first.exists():                                    # the first epoch's checkpoint
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    if ranks == 1:
        assert proc.returncode in (0, 128 + signal.SIGTERM), out
    again = subprocess.run([*args, "resume=auto"], cwd=REPO, env=_env(), text=True, capture_output=True,
                           timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    _check_finished(run, again.stdout + again.stderr)
