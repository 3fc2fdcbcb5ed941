"""The prepared device session (benchmarks/gpu_session.py) as a CPU smoke test, on a Python that
cannot import DALI, faiss, wandb or submitit (tests/blocked_imports), as on the GPU machine."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent
BLOCKER = REPO / "tests" / "blocked_imports"


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{BLOCKER}{os.pathsep}{REPO}", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_the_entry_points_import_without_the_optional_packages():
    code = ("import and_dist.train, and_dist.probe, and_dist.training.trainer, and_dist.eval.prober, "
            "and_dist.data.pil_stream, and_dist.method.discovery, sys\n"
            "for name in ('wandb', 'faiss', 'submitit', 'nvidia.dali'):\n"
            "    try:\n"
            "        __import__(name)\n"
            "        sys.exit(name + ' imported')\n"
            "    except ModuleNotFoundError:\n"
            "        pass\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), text=True, capture_output=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_the_session_runs_every_part_on_the_cpu_and_writes_its_table(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_session.py", "--device", "cpu", "--quick",
                           "--out", str(out), "--work", str(tmp_path / "work")],
                          cwd=REPO, env=_env(), text=True, capture_output=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (table,) = out.glob("*-cpu-x*.md")
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}-cpu-x\d+\.md", table.name)
    text = table.read_text()
    assert re.search(r"- commit: `[0-9a-f]{40}", text) and "--device cpu --quick" in text
    rows = [line.split(" | ") for line in text.splitlines() if re.match(r"\| [a-e] \|", line)]
    for part in "abcde":
        mine = [r for r in rows if r[0] == f"| {part}"]
        assert mine, f"part {part} has neither a row nor a skip line"
        assert all(r[3].strip(" |") in ("ok", "", "time-out") for r in mine), mine   # no FAIL
    checks = [r for r in rows if r[3].strip(" |") == "ok"]
    assert any("NaN" in r[1] for r in checks)                                  # the NaN guard itself
    assert any(r[0] == "| a" and "AND step" in r[1] for r in checks)
    assert any(r[0] == "| e" and "final kNN top-1" in r[2] and "80.8" in r[2] for r in checks)   # e ran to its end
    assert proc.stdout.rstrip().splitlines()[-1].startswith("table written to")
    assert_it_comes_back(out, table.name[:-3])


def test_the_fidelity_projection():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_parts import fitting_epochs, project
    # 200 epochs of 50,000 at 25,000 img/s: 400 s; 11 kNN passes over 10,000 and one over 50,000 at
    # twice that rate: 3.2 s; and the start
    assert abs(project(25_000, 200, 50_000, 10_000, 20, 60) - (60 + 400 + 160_000 / 50_000)) < 1e-9
    assert fitting_epochs(25_000, 200, 50_000, 10_000, 20, 60, 1e9) == 200
    k = fitting_epochs(25_000, 200, 50_000, 10_000, 20, 60, 300)
    assert project(25_000, k, 50_000, 10_000, 20, 60) <= 300 < project(25_000, k + 1, 50_000, 10_000, 20, 60)


@pytest.mark.slow
def test_a_budget_too_small_for_the_fidelity_run_skips_it_with_the_projection(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_session.py", "--device", "cpu", "--quick", "--parts", "e",
                           "--budget", "8", "--out", str(out), "--work", str(tmp_path / "work")],
                          cwd=REPO, env=_env(), text=True, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (table,) = out.glob("*.md")
    (row,) = [line for line in table.read_text().splitlines() if line.startswith("| e |")]
    assert re.search(r"skipped: needs ~\d+ s \(2 epochs at \d+ img/s \(measured in part e\).*\d+ s left: "
                     r"run it alone with --parts e --budget \d+", row), row
    assert not (tmp_path / "work" / "fidelity").exists()      # nothing was started


CIFAR = REPO.parent / "shared" / "datasets" / "cifar10-jpg"
LIMIT = 60 * 2**20          # what may travel to the device machine: 64 MiB, less a margin


def _tracked_bytes() -> int:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return sum((REPO / n).stat().st_size for n in names.decode().split("\0") if n and (REPO / n).is_file())


@pytest.mark.slow
def test_the_repository_and_the_gpu_carry_stay_under_60_mib(tmp_path):
    """The carry of docs/performance.md, made by its two commands from all of CIFAR-10: the pack
    archive with the tracked files stays under 60 MiB, and it unpacks to the 50,000 + 10,000
    samples part e trains on."""
    if not CIFAR.is_dir():
        pytest.skip(f"{CIFAR} is not here (the carry is made from it)")
    archive = REPO / "data" / "cifar10-pack.tar.gz"        # what travels, where the commands put it
    if not archive.exists() or archive.stat().st_mtime < (REPO / "and_dist" / "data" / "sources" / "pack_write.py").stat().st_mtime:
        pack = tmp_path / "cifar10-pack"                     # made again only when missing or older than the writer
        subprocess.run([sys.executable, "-m", "and_dist.prepare", str(CIFAR), str(pack), "--pack"], cwd=REPO,
                       env={**_env(), "PYTHONPATH": str(REPO)}, check=True, capture_output=True, timeout=300)
        made = tmp_path / "cifar10-pack.tar.gz"
        subprocess.run(["tar", "-czf", str(made), "-C", str(tmp_path), "cifar10-pack"], check=True, timeout=120)
        archive.parent.mkdir(exist_ok=True)
        shutil.move(made, archive)                           # kept for the next run (git-ignored data/)
    total = _tracked_bytes() + archive.stat().st_size
    assert total < LIMIT, f"{total / 2**20:.1f} MiB would travel"
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_data import unpacked
    from and_dist.data.sources.pack import open_pack
    train, test = open_pack(str(unpacked(archive, tmp_path / "carry")), None, 2, log=lambda *_: None)
    assert (len(train), len(test)) == (50_000, 10_000)


def test_the_profile_key_traces_steps_after_the_warm_up_into_the_run(tmp_path, capsys):
    """log.profile_steps=2 on the CPU: a Chrome trace and a summary of the top ops in RUN/profile."""
    import json
    from and_dist import train
    run = tmp_path / "run"
    status = train.main(["--config", "demo", f"run_dir={run}", "data.demo_train=128", "data.demo_test=32",
                         "train.batch_size=32", "curriculum.rounds=1", "train.epochs_per_round=2",
                         "eval.every_epochs=0", "checkpoint.every_epochs=0", "eval.knn_k=5", "log.progress=false",
                         "train.threads=1", "data.prefetch=0", "log.profile_steps=2"])
    out = capsys.readouterr().out
    assert status == 0, out
    trace = json.loads((run / "profile" / "trace.json").read_text())
    assert trace["traceEvents"]
    summary = (run / "profile" / "summary.txt").read_text()
    assert summary.startswith("2 steps traced after 5 of warm-up on cpu") and "top ops by self time" in summary
    assert "Self CPU" in summary and "profile of 2 steps written to" in out


def test_the_busy_time_is_the_union_of_the_kernels():
    from and_dist.run.profile import busy_seconds
    assert busy_seconds([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == 4
    assert busy_seconds([]) == 0


def assert_it_comes_back(out: Path, stem: str) -> None:
    """What the device tool returns from its output folder: at most 8 files, each under 16 MiB, no
    deeper than 2 folders (these lie flat); among them the session's log."""
    files = [f for f in out.rglob("*") if f.is_file()]
    assert 0 < len(files) <= 8, files
    assert all(f.stat().st_size < 16 * 2**20 and len(f.relative_to(out).parts) <= 3 for f in files), files
    names = {f.name for f in files}
    assert {f"{stem}.md", f"{stem}-session.log"} <= names, names
    assert all(n.startswith(stem) for n in names), names
    log = (out / f"{stem}-session.log").read_text()
    assert log.startswith(("device ", "warning: ")) and "table written to" in log


def _session(argv: list[str]):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_session
    return gpu_session, gpu_session.main(["--device", "cpu", *argv])


def test_a_budget_past_one_device_command_is_named_in_one_line_at_the_start(tmp_path, capsys):
    gs, status = _session(["--parts", "-", "--budget", "720", "--out", str(tmp_path / "out"),
                           "--work", str(tmp_path / "w")])
    out = capsys.readouterr().out
    assert status == 0
    assert out.splitlines()[0] == ("warning: --budget 720 s cannot fit one 600 s device command with the start-up, "
                                   "the writing and e's stop: use at most 540")
    (table,) = (tmp_path / "out").glob("*.md")
    assert_it_comes_back(tmp_path / "out", table.name[:-3])
    _, status = _session(["--parts", "-", "--out", str(tmp_path / "out2"), "--work", str(tmp_path / "w")])
    out = capsys.readouterr().out
    assert status == 0 and "warning" not in out and "budget 540 s" in out.splitlines()[0]


def test_a_missing_or_damaged_carry_is_refused_in_seconds(tmp_path, capsys):
    import tarfile
    damaged = tmp_path / "damaged.tar.gz"
    (tmp_path / "pack").mkdir()
    (tmp_path / "pack" / "pack.json").write_bytes(os.urandom(300_000))
    with tarfile.open(damaged, "w:gz") as tar:
        tar.add(tmp_path / "pack", "cifar10-pack")
    damaged.write_bytes(damaged.read_bytes()[:150_000])        # cut short on the way
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"not an archive" * 100)
    for carry, why in ((tmp_path / "missing.tar.gz", "no CIFAR-10 at"), (damaged, "damaged carry"),
                       (garbage, "damaged carry")):
        _, status = _session(["--parts", "abcde", "--cifar", str(carry), "--out", str(tmp_path / "out"),
                              "--work", str(tmp_path / carry.name)])
        err = capsys.readouterr().err
        assert status == 3 and err.startswith(f"error: part e's data: {why}"), err
    assert not list((tmp_path / "out").glob("*.md"))              # refused before any part ran


def test_the_projection_counts_syncs_checkpoints_and_the_recompile():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_parts import MAX_BUDGET, alone, project
    base = project(25_000, 200, 50_000, 10_000, 20, 60)
    more = dict(batch=512, sync_every=10, ckpt_every=10, ckpt_s=1.5, once=30.0)
    # 98 steps an epoch: 9.8 loss reads + 1 epoch sync, each a step of 512 images; 21 checkpoints
    want = base + 200 * (98 / 10 + 1) * 512 / 25_000 + 21 * 1.5 + 30
    assert abs(project(25_000, 200, 50_000, 10_000, 20, 60, **more) - want) < 1e-9
    for rate in (10_000, 25_000, 40_000):           # every piece of advice fits one command
        need = project(rate, 200, 50_000, 10_000, 20, 60, **more) + 20
        line = alone(True, need, rate, 200, 50_000, 10_000, 20, more)
        budget = int(re.search(r"--budget (\d+)", line).group(1))
        assert budget <= MAX_BUDGET, line
        if need > MAX_BUDGET - 30:
            k = int(re.search(r"--e-epochs (\d+)", line).group(1))
            assert project(rate, k, 50_000, 10_000, 20, 60, **more) + 20 <= MAX_BUDGET - 30 < need
