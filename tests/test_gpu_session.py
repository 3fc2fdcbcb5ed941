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


def test_the_fidelity_projection():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_session import fitting_epochs, project
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
    archive (and pytest for part a) with the tracked files stays under 60 MiB, and it unpacks to
    the 50,000 + 10,000 samples part e trains on."""
    import pytest
    if not CIFAR.is_dir():
        pytest.skip(f"{CIFAR} is not here (the carry is made from it)")
    archive = REPO / "data" / "cifar10-pack.tar.gz"        # what travels, where the commands put it
    if not archive.exists() or archive.stat().st_mtime < (REPO / "and_dist" / "data" / "pack_write.py").stat().st_mtime:
        pack = tmp_path / "cifar10-pack"                     # made again only when missing or older than the writer
        subprocess.run([sys.executable, "-m", "and_dist.prepare", str(CIFAR), str(pack), "--pack"], cwd=REPO,
                       env={**_env(), "PYTHONPATH": str(REPO)}, check=True, capture_output=True, timeout=300)
        made = tmp_path / "cifar10-pack.tar.gz"
        subprocess.run(["tar", "-czf", str(made), "-C", str(tmp_path), "cifar10-pack"], check=True, timeout=120)
        archive.parent.mkdir(exist_ok=True)
        shutil.move(made, archive)                           # kept for the next run (git-ignored data/)
    deps = sum(f.stat().st_size for m in ("pytest", "_pytest", "pluggy", "iniconfig", "packaging")
               for f in Path(__import__(m).__file__).parent.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
    total = _tracked_bytes() + archive.stat().st_size + deps
    assert total < LIMIT, f"{total / 2**20:.1f} MiB would travel"
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_session import unpacked
    from and_dist.data.pack import open_pack
    train, test = open_pack(str(unpacked(archive, tmp_path / "carry")), None, 2, log=lambda *_: None)
    assert (len(train), len(test)) == (50_000, 10_000)
