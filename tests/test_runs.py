"""Runs that are safe to start, stop and read: run directories, the lock, exit statuses, one-line
runtime input errors, strict JSON and log-file output, and the instance-discrimination baseline."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from and_dist import train as entry
from helpers import free_port, main_here

from and_dist.run import checkpoint, rundir

REPO = Path(__file__).parent.parent
ENV = {"PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": "/tmp"}
TINY = ["--config", "demo", "data.demo_train=200", "data.demo_test=50", "curriculum.rounds=1",
        "train.epochs_per_round=1", "eval.knn_k=10", "train.threads=1"]


def train(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "and_dist.train", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout, env=ENV)


def start(*args: str, torchrun: int = 0) -> subprocess.Popen:
    head = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}",
            f"--master_port={free_port()}"] if torchrun else [sys.executable]
    cmd = [*head, "-m", "and_dist.train", *args]
    return subprocess.Popen(cmd, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def train_here(capsys, *args: str) -> subprocess.CompletedProcess:
    return main_here(capsys, entry.main, *args)


def stop_saved_its_checkpoint(out: str, run: Path) -> None:
    """The line before "stopped by signal 15 at round R epoch E step S" is that stop's own save,
    of r{R}-e{E}-s{S}, and it is the run's latest (not a periodic save that happened to be there)."""
    lines = out.splitlines()
    (i,) = [n for n, line in enumerate(lines) if "stopped by signal 15 at" in line]
    r, e, s = re.search(r"stopped by signal 15 at round (\d+) epoch (\d+) step (\d+)", lines[i]).groups()
    name = f"r{r}-e{e}-s{s}"
    assert lines[i - 1].endswith(f"checkpoint {run / 'checkpoints' / name}"), lines[i - 1]
    assert (run / "checkpoints" / "latest").read_text().strip() == name
    manifest = checkpoint.verify(run / "checkpoints" / name)      # every file it lists, whole
    assert any(f.startswith("bank-") for f in manifest["files"])


def one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


# ------------------------------------------------------------------------------ run directories

@pytest.mark.slow
def test_a_fresh_run_into_a_used_run_dir_is_refused_and_the_old_run_kept(tmp_path):
    run = tmp_path / "mine"
    assert train(*TINY, f"run_dir={run}").returncode == 0
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    one_line_error(train(*TINY, f"run_dir={run}"), "resume=auto")
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_a_second_process_on_a_live_run_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "live"
    first = start(*TINY, f"run_dir={run}", "train.epochs_per_round=50")
    try:
        wait_for(run / "metrics.jsonl", first)
        second = train(*TINY, f"run_dir={run}", "resume=auto")
        one_line_error(second, f"in use by pid {first.pid}")
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert not (run / rundir.LOCK).exists()           # released on exit
    # a stale lock (dead pid on this host) does not block
    (run / rundir.LOCK).write_text(json.dumps({"host": os.uname().nodename, "pid": 2 ** 22 + 7, "slurm_job": ""}))
    assert train(*TINY, f"run_dir={run}", "resume=auto").returncode == 0


# ---------------------------------------------------------------------------------- exit status

@pytest.mark.slow
def test_sigterm_saves_and_exits_143_without_a_traceback(tmp_path):
    run = tmp_path / "stop"
    proc = start(*TINY, f"run_dir={run}", "train.epochs_per_round=50")
    wait_for(run / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by signal 15" in out and "Traceback" not in out + err
    stop_saved_its_checkpoint(out, run)
    assert not (run / "summary.json").exists()


@pytest.mark.slow
def test_sigterm_under_torchrun_every_rank_exits_143_without_a_traceback(tmp_path):
    """SIGTERM reaches the ranks (as SLURM delivers it to every task); they save one checkpoint
    together and the job ends with the first rank's 143."""
    run = tmp_path / "stop2"
    proc = start(*TINY, f"run_dir={run}", "train.epochs_per_round=50", torchrun=2)
    wait_for(run / "metrics.jsonl", proc)
    ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2
    for pid in ranks:
        os.kill(int(pid), signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert out.count("stopped by signal 15") == 1           # rank 0 speaks for the job
    # the first rank to end exits 143 after the save; torchrun then SIGTERMs the ranks still
    # closing down (-15 in its summary), which by then have written their part of the checkpoint
    root = re.search(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", err, re.S)
    assert root and root.group(1) == "143", err
    assert set(re.findall(r"exitcode\s*:\s*(-?\d+)", err)) <= {"143", "-15"}, err
    assert "and_dist" not in "".join(l for l in err.splitlines() if l.strip().startswith("File "))
    stop_saved_its_checkpoint(out, run)


# ------------------------------------------------------------------------ runtime input errors

def _jpeg(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)


def _tree(root: Path, train=("a", "b"), test=("a", "b"), images=2) -> Path:
    for split, classes in (("train", train), ("test", test)):
        for c in classes:
            for i in range(images):
                _jpeg(root / split / c / f"{i}.png", i)
    return root


def _folder(root: Path, *extra: str) -> list[str]:
    return [*TINY, "data.source=imagefolder", f"data.root={root}", "data.image_size=8",
            "model.arch=convnet_small", "train.batch_size=2", "eval.knn_k=2", *extra]


def test_runtime_input_errors_are_one_line(tmp_path, capsys):
    runs = f"out_dir={tmp_path / 'runs'}"
    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    (empty / "test" / "a").mkdir(parents=True)
    one_line_error(train_here(capsys, *_folder(empty, runs)), "holds no images")
    flat = tmp_path / "flat"
    _jpeg(flat / "train" / "x.png")
    _jpeg(flat / "test" / "a" / "x.png")
    one_line_error(train_here(capsys, *_folder(flat, runs)), "one sub-folder per class")
    bad = _tree(tmp_path / "bad")
    for f in (bad / "train").rglob("*.png"):
        f.write_bytes(b"not an image")
    one_line_error(train_here(capsys, *_folder(bad, runs)), "every train image is unreadable")
    differ = _tree(tmp_path / "differ", test=("a", "c"))
    one_line_error(train_here(capsys, *_folder(differ, runs)), "differ from train's")
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_line_error(train_here(capsys, *_folder(afile, runs)), "is a file")
    one_line_error(train_here(capsys, *_folder(_tree(tmp_path / "ok"), runs, f"data.cache_dir={afile}")), "data.cache_dir")
    one_line_error(train_here(capsys, *TINY, "data.source=cifar10", f"data.root={tmp_path / 'dl'}", "data.download=true", runs),
                   "cannot fetch")
    # a probe layer that the model lacks fails before pretraining, not after it
    one_line_error(train_here(capsys, *TINY, runs, "probe.after_train=true", "probe.layers=[conv9]"), "no module 'conv9'")


@pytest.mark.slow
def test_resume_with_other_data_or_arch_names_both(tmp_path):
    run = tmp_path / "r"
    assert train(*TINY, f"run_dir={run}").returncode == 0
    one_line_error(train(*TINY, f"run_dir={run}", "resume=auto", "data.demo_train=300"), "300 samples")
    one_line_error(train(*TINY, f"run_dir={run}", "resume=auto", "model.arch=convnet_gn"),
                   "model.arch='convnet_small'")


@pytest.mark.slow
def test_an_unreadable_cache_is_rebuilt_with_a_line(tmp_path):
    root, cache = _tree(tmp_path / "t"), tmp_path / "cache"
    args = _folder(root, f"out_dir={tmp_path / 'runs'}", f"data.cache_dir={cache}")
    assert train(*args).returncode == 0
    for f in cache.glob("*.pt"):
        f.write_bytes(b"garbage")
    proc = train(*args)
    assert proc.returncode == 0, proc.stderr
    assert "unreadable" in proc.stdout and "decoding the images again" in proc.stdout


@pytest.mark.slow
def test_skipped_images_are_counted_and_listed(tmp_path):
    root = _tree(tmp_path / "s", images=3)
    (root / "train" / "a" / "broken.png").write_bytes(b"\x89PNG broken")
    proc = train(*_folder(root, f"run_dir={tmp_path / 'run'}"))
    assert proc.returncode == 0, proc.stderr
    assert "1 skipped (skipped.txt)" in proc.stdout
    assert "broken.png" in (tmp_path / "run" / "skipped.txt").read_text()


# ------------------------------------------------------------------------------------ output

@pytest.mark.slow
def test_log_file_output_is_small_and_summary_is_strict_json(tmp_path):
    run = tmp_path / "quiet"
    proc = train(*TINY, f"run_dir={run}", "eval.every_epochs=0", "train.epochs_per_round=2",
                 "curriculum.rounds=2")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout) + len(proc.stderr) < 4 * 2048, "more than ~2 KB per epoch"
    assert proc.stdout.count("epoch 1: loss") == 2 and "img/s" in proc.stdout
    assert "\r" not in proc.stdout + proc.stderr
    assert "run directory" in proc.stdout and "1 rank" in proc.stdout and "200 train / 50 test" in proc.stdout
    summary = json.loads((run / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert summary["best_bank_knn"] is None and summary["rounds"][0]["consistency"] is None
    assert "top-1 -" in proc.stdout                          # not measured: "-", never -1.00


@pytest.mark.slow
def test_seconds_add_up_over_resumed_segments(tmp_path):
    run = tmp_path / "seg"
    proc = start(*TINY, f"run_dir={run}", "train.epochs_per_round=4", "checkpoint.every_epochs=1")
    wait_for(run / "checkpoints" / "r0-e1-s0", proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    done = train(*TINY, f"run_dir={run}", "train.epochs_per_round=4", "resume=auto")
    assert done.returncode == 0, done.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["segments"] == 2 and summary["seconds"] > summary["last_segment_seconds"]


# ---------------------------------------------------------------------------------- baseline

@pytest.mark.slow
def test_instance_baseline_makes_no_anchors_and_trains_the_same_steps(tmp_path):
    runs = {}
    for method in ("and", "instance"):
        run = tmp_path / method
        proc = train(*TINY, f"run_dir={run}", f"curriculum.method={method}", "curriculum.rounds=2",
                     "log.every_steps=1")
        assert proc.returncode == 0, proc.stderr
        runs[method] = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    steps = {m: sum(e["event"] == "step" for e in ev) for m, ev in runs.items()}
    assert steps["and"] == steps["instance"] > 0
    anchors = {m: [e["anchors"] for e in ev if e["event"] == "round"] for m, ev in runs.items()}
    assert anchors == {"and": [0, 50], "instance": [0, 0]}
    diag = {m: [(e["round"], e["anchor_consistency"] is None, 0 <= e["all_consistency"] <= 1)
                for e in ev if e["event"] == "diagnostics"] for m, ev in runs.items()}
    assert diag == {"and": [(1, False, True)], "instance": [(1, True, True)]}   # neighbourhoods, no anchors
    # the pictures of a 2-round run: anchors with neighbours, entropy histogram, per-round chart
    sizes = {}
    for name in ("anchors-round1.png", "entropy-round1.png", "rounds.png"):
        with Image.open(tmp_path / "and" / name) as im:
            sizes[name] = im.size
    assert all(w >= 300 and h >= 250 for w, h in sizes.values()), sizes
    assert not (tmp_path / "instance" / "anchors-round1.png").exists()   # no anchors, no grid


def test_progress_in_a_log_file_is_a_line_every_interval_never_a_redraw():
    from and_dist.platform.log import _LineBar
    lines = []
    bar = _LineBar(100, "round 1 discovery", lines.append, every=0.05)
    t0 = time.monotonic()
    for _ in range(10):
        time.sleep(0.02)
        bar.update(10)
    took = time.monotonic() - t0         # >= 0.2 s; longer on a loaded machine, so more lines
    assert 2 <= len(lines) <= min(10, took / 0.05 + 1) and all(l.startswith("round 1 discovery: ") and "ETA" in l for l in lines)
    assert "\r" not in "".join(lines)
