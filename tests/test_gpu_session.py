"""The prepared device session (benchmarks/gpu_session.py) as a CPU smoke test, on a Python that
cannot import DALI, faiss, wandb or submitit (tests/blocked_imports), as on the GPU machine."""
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parent.parent
BLOCKER = REPO / "tests" / "blocked_imports"


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{BLOCKER}{os.pathsep}{REPO}", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


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
    rows = [line.split(" | ") for line in text.splitlines() if re.match(r"\| [abcd] \|", line)]
    for part in "abcd":
        mine = [r for r in rows if r[0] == f"| {part}"]
        assert mine, f"part {part} has neither a row nor a skip line"
        assert all(r[3].strip(" |") in ("ok", "", "time-out") for r in mine), mine   # no FAIL
    checks = [r for r in rows if r[3].strip(" |") == "ok"]
    assert any("NaN" in r[1] for r in checks)                                  # the NaN guard itself
    assert any(r[0] == "| a" and "AND step" in r[1] for r in checks)
    assert proc.stdout.rstrip().splitlines()[-1].startswith("table written to")
