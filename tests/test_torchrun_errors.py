"""A multi-rank failure under torchrun: torchrun's summary names the first failing rank with its
exception and traceback (the error file platform/errors.record_for_torchrun writes), each rank
keeps its one `error:` line, and the Flight Recorder traces of every failing rank
(platform/flight.py) land in the run's comm_traces/, where torchfrtrace names the collective the
ranks did not all join."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import WORKERS, free_port

REPO = Path(__file__).parent.parent


def torchrun_summary(linger: float, timeout: float, run: Path) -> tuple[int, str, str]:
    """(exit status, the whole output, the summary's root-cause section) of 2 ranks where rank 1 fails."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", str(WORKERS / "entry_worker.py"), str(linger), str(timeout),
                           str(run)],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert "Root Cause (first observed failure):" in out, out
    root = out.split("Root Cause (first observed failure):")[1].split("=" * 20)[0]
    return proc.returncode, out, root


@pytest.mark.slow
@pytest.mark.parametrize("linger, timeout", [(0, 60), (20, 3)], ids=["fails-and-exits", "rank0-times-out-first"])
def test_the_summary_names_the_failing_rank_and_its_traceback(linger, timeout, tmp_path):
    """fails-and-exits: rank 1 exits at once and torchrun stops rank 0. rank0-times-out-first:
    rank 1 hangs on its way out, so rank 0's collective_timeout ends first (exit 3, its line
    naming rank 1); only the time in rank 1's error file still makes it the root cause."""
    code, out, root = torchrun_summary(linger, timeout, tmp_path)
    assert code == 1
    assert "[rank 1] error: ValueError: planted failure on rank 1" in out.splitlines()
    assert "rank      : 1 (local_rank: 1)" in root
    assert "error_file: <N/A>" not in root
    assert 'entry_worker.py", line' in root and "ValueError: planted failure on rank 1" in root
    if linger:
        stall = [line for line in out.splitlines() if line.startswith("[rank 0] error: ")]
        assert len(stall) == 1 and "rank 1" in stall[0] and "stopped answering" in stall[0], out


@pytest.mark.slow
def test_a_stall_line_names_the_flight_recorder_traces_torchfrtrace_reads(tmp_path):
    """gloo: rank 1 fails outside the collective rank 0 waits in; both ranks dump their traces."""
    code, out, _ = torchrun_summary(20, 3, tmp_path)
    traces = tmp_path / "comm_traces"
    stall = [line for line in out.splitlines() if line.startswith("[rank 0] error: ")]
    assert stall and stall[0].endswith(f"; collective traces in {traces} (torchfrtrace {traces} -p rank_)"), out
    assert sorted(p.name for p in traces.iterdir()) == ["rank_0", "rank_1"]
    read = subprocess.run([str(Path(sys.executable).parent / "torchfrtrace"), str(traces), "-p", "rank_"],
                          capture_output=True, text=True, timeout=60)
    said = read.stdout + read.stderr                 # it reports through logging, on stderr
    assert read.returncode == 0, said
    assert "Not all ranks joining collective" in said and "missing ranks: {1}" in said
    assert "collective: gloo:all_reduce" in said and "body at " in said    # rank 0's stack
