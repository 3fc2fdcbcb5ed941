"""Faults a cluster adds, with real processes and real files: a damaged newest checkpoint, a
write that fails (a file-size limit: EFBIG at the write, as ENOSPC would be), a SIGKILL inside
a checkpoint write, a rank stopped by SIGSTOP; and the fsync order of a save."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import free_port
import torch

from and_dist.run import checkpoint

REPO = Path(__file__).parent.parent
ENV = {"PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
       "HOME": "/tmp"}
# 2 steps an epoch, a checkpoint after every epoch: r0-e1-s0 (step 2), r0-e2-s0 (step 4), r0-end (step 6)
RUN = ["--config", "demo", "data.demo_train=200", "data.demo_test=50", "curriculum.rounds=1",
       "train.epochs_per_round=3", "eval.knn_k=10", "eval.every_epochs=0", "train.threads=1",
       "checkpoint.every_epochs=1", "checkpoint.keep=3", "log.progress=false"]


def train(run: Path | None, *args: str, env=None, **popen) -> subprocess.CompletedProcess:
    where = [f"run_dir={run}"] if run else []
    return subprocess.run([sys.executable, "-m", "and_dist.train", *RUN, *where, *args], cwd=REPO,
                          text=True, capture_output=True, timeout=300, env={**ENV, **(env or {})}, **popen)


def bank(ckpt: Path) -> torch.Tensor:
    return torch.load(ckpt / "bank-0.pt", weights_only=True)["rows"]


def final(run: Path) -> tuple:
    s = json.loads((run / "summary.json").read_text())
    return s["final_knn_top1"], s["final_knn_top5"], bank(run / "checkpoints" / "r0-end")


def same(a: tuple, b: tuple) -> bool:
    return a[:2] == b[:2] and torch.equal(a[2], b[2])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ref") / "run"
    done = train(run)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "r0-e1-s0", "r0-e2-s0", "r0-end"]
    return run


def copy_of(reference: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "summary.json").unlink()
    return run


# ------------------------------------------------------------------------- damaged checkpoints

def _truncate(f: Path):
    os.truncate(f, f.stat().st_size // 2)


def _flip(f: Path):
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize("part, damage, says", [
    ("state.pt", _truncate, "bytes, the manifest says"),
    ("bank-0.pt", Path.unlink, "bank-0.pt: missing"),
    ("state.pt", _flip, "state.pt: checksum mismatch"),
])
def test_a_damaged_newest_checkpoint_resumes_from_the_newest_intact_to_the_same_numbers(
        reference, tmp_path, part, damage, says):
    run = copy_of(reference, tmp_path)
    damage(run / "checkpoints" / "r0-end" / part)
    done = train(run, "resume=auto")
    assert done.returncode == 0, done.stderr
    warning = [l for l in done.stderr.splitlines() if "damaged" in l]
    assert len(warning) == 1 and says in warning[0] and str(run / "checkpoints" / "r0-end") in warning[0]
    assert f"resuming from {run / 'checkpoints' / 'r0-e2-s0'} (step 4), re-running 2 steps" in warning[0]
    assert same(final(run), final(reference))
    checkpoint.verify(run / "checkpoints" / "r0-end")             # the re-run wrote it again, intact


@pytest.mark.slow
def test_no_intact_checkpoint_or_a_damaged_one_named_is_one_line_exit_2(reference, tmp_path):
    run = copy_of(reference, tmp_path)
    _flip(run / "checkpoints" / "r0-end" / "state.pt")
    named = train(None, f"out_dir={tmp_path}", f"resume={run / 'checkpoints' / 'r0-end'}")
    assert named.returncode == 2 and len(named.stderr.strip().splitlines()) == 1, named.stderr
    assert f"the newest intact one is {run / 'checkpoints' / 'r0-e2-s0'}" in named.stderr
    for name in ("r0-e1-s0", "r0-e2-s0"):
        (run / "checkpoints" / name / "manifest.json").unlink()
    none = train(run, "resume=auto")
    assert none.returncode == 2 and len(none.stderr.strip().splitlines()) == 1, none.stderr
    assert "no intact checkpoint" in none.stderr and "manifest.json: missing" in none.stderr


# ---------------------------------------------------------------------------- a failed write

def _file_limit(limit: int):
    def set_limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)         # the write fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return set_limit


@pytest.mark.slow
def test_a_save_that_cannot_write_leaves_the_previous_checkpoint_latest(reference, tmp_path):
    """state.pt (2 MB) exceeds the limit, every other file stays under it."""
    run = copy_of(reference, tmp_path)
    ckpts = run / "checkpoints"
    before = {p: p.read_bytes() for p in ckpts.rglob("*") if p.is_file()}
    failed = train(run, "resume=auto", "curriculum.rounds=2", preexec_fn=_file_limit(1 << 20))
    assert failed.returncode == 1, failed.stderr
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert f"cannot write {ckpts / '.tmp-r1-e1-s0' / 'state.pt'}: File too large" in lines[0]
    assert "latest is still r0-end" in lines[0]
    assert {p: p.read_bytes() for p in ckpts.rglob("*") if p.is_file()} == before   # nothing new, nothing left
    assert checkpoint.find_latest(ckpts) == ckpts / "r0-end"


# ---------------------------------------------------------------------- a kill inside a write

@pytest.mark.slow
def test_sigkill_inside_a_checkpoint_write_resumes_from_the_previous(reference, tmp_path):
    """The hook holds each save 1 s with its files written; the kill lands in the second save."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "and_dist.train", *RUN, f"run_dir={run}"], cwd=REPO,
                            env={**ENV, "AND_TEST_SLOW_SAVE": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    partial = run / "checkpoints" / ".tmp-r0-e2-s0"
    deadline = time.time() + 120
    while not (partial / "state.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert (partial / "state.pt").exists() and (run / "checkpoints" / "latest").read_text() == "r0-e1-s0"
    done = train(run, "resume=auto")
    assert done.returncode == 0, done.stderr
    assert f"removed {partial}, left by an interrupted save" in done.stderr
    assert f"resuming {run / 'checkpoints' / 'r0-e1-s0'} at round 0 epoch 1 step 0" in done.stdout
    assert not partial.exists()
    assert same(final(run), final(reference))


def test_fsync_order_files_then_manifest_then_directories_then_latest(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(a), str(b)))
        return real_replace(a, b)

    class Shard(torch.nn.Linear):
        sharded = True

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    root = tmp_path / "ck"
    checkpoint.save(root, "a", {"model": torch.nn.Linear(3, 2), "bank": Shard(2, 2)})
    tmp, final = str(root / ".tmp-a"), str(root / "a")
    order = [e[1] if e[0] == "fsync" else f"{e[1]} -> {e[2]}" for e in events]
    latest_tmp = next(e[1] for e in events if e[0] == "fsync" and ".latest.tmp" in e[1])
    assert order == [f"{tmp}/bank-0.pt", f"{tmp}/state.pt", f"{tmp}/manifest.json", tmp,
                     f"{tmp} -> {final}", str(root), latest_tmp, f"{latest_tmp} -> {root}/latest", str(root)]
    assert checkpoint.verify(root / "a")["files"].keys() == {"bank-0.pt", "state.pt"}


# -------------------------------------------------------------------------------- a stalled rank

def ended_by_us(err: str, timeout: int) -> list[str]:
    """The one error line of rank 0, checked to name rank 1 as stopped and killed by rank 0, with
    torchrun never falling back to its 30 s wait for a stopped process to take SIGTERM."""
    said = [l for l in err.splitlines() if l.startswith("[rank 0] error:")]
    assert len(said) == 1 and "rank 1" in said[0] and "stopped answering" in said[0], err
    assert "on this host, killed]" in said[0] and f"collective_timeout={timeout} s" in said[0], err
    assert "Unable to shutdown process" not in err, err
    return said[0]


@pytest.mark.slow
def test_a_stopped_rank_ends_the_run_within_the_timeout_naming_it_and_the_run_resumes(tmp_path):
    """SIGSTOP lands wherever rank 1 is (a named wait, DDP's buffer broadcast, a GPU-free step)."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "and_dist.train", *RUN, f"run_dir={run}", "train.epochs_per_round=50",
           "train.collective_timeout=8"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stopped = None
    try:
        deadline = time.time() + 120
        while not (run / "checkpoints" / "latest").exists():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.1)
        for pid in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split():
            if b"RANK=1\0" in Path(f"/proc/{pid}/environ").read_bytes().replace(b"LOCAL_RANK", b"L"):
                stopped = int(pid)
        os.kill(stopped, signal.SIGSTOP)
        t0 = time.time()
        out, err = proc.communicate(timeout=120)
        took = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        if stopped:
            for sig in (signal.SIGKILL, signal.SIGCONT):
                try:
                    os.kill(stopped, sig)
                except ProcessLookupError:
                    pass
    assert proc.returncode != 0
    said = ended_by_us(err, 8)
    assert "rank 0 waited in" in said
    # The functional checks above are the test; this bound only separates the two ways a run can
    # end: the slow way (torchrun's SIGTERM fallback) takes at least 8 + 30 s however idle the host.
    assert took < 8 + 30, took
    resumed = train(run, "resume=auto", "train.epochs_per_round=2")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout


@pytest.mark.slow
@pytest.mark.parametrize("where", ["ddp_forward", "ddp_backward"])
def test_a_rank_stopped_in_a_ddp_collective_is_named_and_ended(where):
    """The waits outside dist.py's helpers: DDP's buffer broadcast raises gloo's 'Application
    timeout caused pair closure' or 'Timed out', its gradient all-reduce raises from autograd.
    Rank 1 stops itself right there (tests/workers/stall_worker.py), so the case is met each time."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "tests" / "workers" / "stall_worker.py"), where]
    done = subprocess.run(cmd, cwd=REPO, env={**ENV, "STALL_TIMEOUT": "3"}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    said = ended_by_us(done.stderr, 3)
    assert ("torch's" in said) == (where == "ddp_forward"), said


# ------------------------------------------------------------------------ wandb across a resume

@pytest.mark.slow
def test_wandb_steps_keep_growing_across_resumes_from_one_checkpoint(tmp_path):
    """Resumed twice from the same checkpoint (the second time after a crash): every step sent to
    wandb (offline, real) is above every step it saw before, the true step beside it."""
    from and_dist.platform.log import RunLog

    def segment(state, steps):
        log = RunLog(tmp_path, True, False, "offline", "p", "", {}, "n")
        if state is not None:
            log.load_state_dict(state)
        log.start_wandb()
        for s in steps:
            log.event(event="step", step=s, loss=float(s))
        return log

    first = segment(None, range(1, 4))
    state = first.state_dict()                  # the checkpoint at step 3
    for s in range(4, 8):
        first.event(event="step", step=s, loss=float(s))
    first.close()
    segment(state, range(4, 6)).close()         # crashed at step 5, before any checkpoint
    segment(state, range(4, 8)).close()
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(1, 8))                   # the file: as if never stopped
    assert [l["wandb_step"] for l in lines] == [1, 2, 3, 12, 13, 14, 15]     # wandb saw 1..7, then 9, 10
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 3


# ------------------------------------------------------------------------ a stop outside a loop

def test_a_stop_hidden_by_a_failing_cleanup_is_still_a_stop(tmp_path, capsys):
    """A real SIGTERM during a durable write whose library cleanup then fails (as torch.save's zip
    writer does when its file is cut short): the temporary file is removed and the entry point
    still exits 128 + 15 with its one line, not 1 with the cleanup's error."""
    from and_dist.platform import files
    from and_dist.run.stop import exits_on_stop

    def fill(f):
        try:
            f.write(b"half of it")
            os.kill(os.getpid(), signal.SIGTERM)        # handled at the next bytecode: Stopped
            f.write(b"the rest")
        finally:
            raise RuntimeError("unexpected pos 10 vs 18")  # the library's cleanup, failing

    @exits_on_stop("run it again")
    def main() -> int:
        files._publish(tmp_path / "out.bin", fill)
        return 0

    assert main() == 128 + signal.SIGTERM
    assert "stopped by SIGTERM: nothing half-written is left; run it again" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
