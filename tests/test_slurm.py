"""launch/slurm.py against a real SLURM cluster (`shared/tools/local-slurm.sh up`, which .ci/run
starts): a 2-task job trains as one local process does, a USR2 mid-epoch checkpoints, requeues and
resumes to the same result, a probe job waits for pretraining, a sweep is one array, and bad input
fails before submission. Every wait has a deadline; jobs still queued at the end are cancelled.
The dry-run and input tests that need no cluster always run."""
import json
import re
import shutil
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent
sys.path.append(str(REPO / "launch"))
import partition  # noqa: E402  (launch/ is a folder of scripts, not a package)

ENV = {"PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
       "OMP_NUM_THREADS": "1", "HOME": "/tmp", "WANDB_SILENT": "true"}
# float64 + GroupNorm: any world size gives the same numbers (up to summation order) as 1 process
TINY = ["data.demo_train=300", "data.demo_test=100", "curriculum.rounds=2", "train.epochs_per_round=2",
        "train.threads=1", "model.sync_bn=true", "train.dtype=float64", "model.arch=convnet_gn",
        "train.batch_size=32", "log.every_steps=1", "eval.knn_k=20"]
TWO_TASKS = ["--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "10"]
PROBE = ["probe.epochs=1", "probe.layers=[features]", "probe.batch_size=64"]
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}


def _no_cluster() -> str:
    """Why the cluster tests cannot run here ('' when they can)."""
    if shutil.which("sbatch") is None:
        return "no SLURM client (sbatch) on this machine; .ci/run starts one with shared/tools/local-slurm.sh"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
        idle = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30).stdout.split()
    except subprocess.TimeoutExpired as e:
        return f"SLURM does not answer: {' '.join(e.cmd)} timed out"
    if "UP" not in ping.stdout:
        return f"slurmctld is not answering: {ping.stdout.strip() or ping.stderr.strip()}"
    if not set(idle) & {"idle", "mixed", "allocated"}:
        return f"no usable SLURM node (states: {' '.join(idle) or 'none'})"
    return ""


NO_CLUSTER = _no_cluster()
needs_cluster = pytest.mark.skipif(bool(NO_CLUSTER), reason=f"SLURM tests skipped: {NO_CLUSTER}")
SUBMITTED: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def cancel_leftovers():
    yield
    if SUBMITTED and not NO_CLUSTER:
        subprocess.run(["scancel", *{j.split("_")[0] for j in SUBMITTED}], capture_output=True, timeout=30)


def launch(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "slurm.py"), *args], cwd=cwd, env={**ENV, **(env or {})},
                          text=True, capture_output=True, timeout=120)
    SUBMITTED.extend(re.findall(r"submitted \w+ job (\S+)", proc.stdout))
    return proc


def submitted(proc) -> list[tuple[str, str, Path, Path]]:
    """(kind, job id, run directory, task-0 log) per job the launcher printed."""
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = re.findall(r"submitted (\w+) job (\S+).*\n  run directory (.+)\n  log (.+)\n", proc.stdout)
    assert rows, proc.stdout
    return [(k, j, Path(r), Path(log)) for k, j, r, log in rows]


def job_info(job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_job(job: str, log: Path, timeout: float = 150) -> dict:
    """The job's final scontrol record; on a deadline, cancel it and show its log."""
    deadline = time.time() + timeout
    while (info := job_info(job)).get("JobState") not in DONE:
        if time.time() > deadline:
            subprocess.run(["scancel", job], timeout=30)
            pytest.fail(f"job {job} still {info.get('JobState')} after {timeout}s; log:\n{_tail(log)}")
        time.sleep(0.5)
    return info


def _tail(log: Path) -> str:
    text = "".join(p.read_text() for p in sorted(log.parent.glob(log.name.split("_log")[0][:-1] + "*_log.*")))
    return text[-4000:]


def events(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def results(run: Path) -> list:
    """What a run measured, without its timings and wandb's step (present only with wandb on):
    per-round rows, epoch losses, kNN, the final line."""
    keep = ("round", "knn", "final", "discovery", "epoch")
    left_out = {"seconds", "images_per_s", "data_wait_ms", "compute_ms", "step_ms", "data_wait_share", "wandb_step"}
    return [{k: v for k, v in e.items() if k not in left_out}
            for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["event"] in keep]


def assert_same_results(run: Path, reference: Path) -> None:
    """Equal up to float64 summation order (the ranks' partial sums add up in another order): losses
    to 1e-9, counts exactly, a kNN accuracy within one of the 100 test images (a near-tie in its
    vote may fall either way)."""
    got, want = results(run), results(reference)
    assert len(got) == len(want) and [e.keys() for e in got] == [e.keys() for e in want]
    for g, w in zip(got, want):
        for k in w:
            if k.startswith("knn"):
                same = abs(g[k] - w[k]) <= 1.0
            elif isinstance(w[k], float):
                same = g[k] == pytest.approx(w[k], rel=1e-9)
            else:
                same = g[k] == w[k]
            assert same, (k, g, w)


def one_line_error(proc, needle: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr
    assert "submitted" not in proc.stdout and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory) -> Path:
    """TINY as one local process: what every SLURM run of TINY must measure."""
    out = tmp_path_factory.mktemp("local")
    proc = subprocess.run([sys.executable, "-m", "and_dist.train", "--config", "demo", *TINY, f"run_dir={out}"],
                          cwd=REPO, env=ENV, text=True, capture_output=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


# ------------------------------------------------------------------------ no cluster needed

def test_sinfo_lines_give_partitions_and_their_largest_nodes():
    parts = partition.parse("gpu*|4|64|gpu:a100:8(S:0-1)\ngpu*|2|32|gpu:4\ncpu|10|128+|(null)\n")
    assert parts[""] == parts["gpu"] == partition.Partition("gpu", 6, 64, 8)
    assert parts["cpu"] == partition.Partition("cpu", 10, 128, 0)
    assert partition.problems(parts, "gpu", 2, 8, 8, 8) == []
    assert "at most 8 GPUs" in partition.problems(parts, "", 1, 9, 9, 1)[0]
    assert "unknown partition 'big'" in partition.problems(parts, "big", 1, 0, 1, 1)[0]
    assert "has 10 nodes" in partition.problems(parts, "cpu", 11, 0, 1, 1)[0]
    timed = partition.parse("short|2|8|(null)|30:00\nlong*|2|8|(null)|2-00:00:00\nfree|1|8|(null)|infinite\n")
    assert [timed[p].max_minutes for p in ("short", "long", "free")] == [30, 2880, None]


@pytest.mark.slow
def test_dry_run_prints_a_16_rank_batch_script_and_submits_nothing(tmp_path):
    proc = launch("--config", "imagenet_alexnet.yaml", "--dry-run", "--nodes", "2", "--gpus-per-node", "8",
                  f"out_dir={tmp_path}", "--sbatch", "reservation=r1", "--sbatch", "exclusive", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout.split("# ---- batch script")[1].split("# ----")[0]
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --signal=USR2@", "-m submitit.core._submit", "#SBATCH --requeue\n",
                 "#SBATCH --reservation=r1\n", "#SBATCH --exclusive\n", "SRUN_CPUS_PER_TASK="):
        assert line in script, script
    assert "wckey" not in script
    assert "# 16 ranks" in proc.stdout
    assert "name: imagenet_alexnet" in proc.stdout and "arch: alexnet_bn" in proc.stdout  # the resolved config
    assert not any(tmp_path.iterdir())                                # nothing written, nothing submitted
    assert "submitted" not in proc.stdout and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_container_image_runs_every_task_in_it_with_the_paths_mounted(tmp_path):
    proc = launch("--config", "demo", "--dry-run", f"out_dir={tmp_path}", "--container-image", "/img/and_dist.sqsh",
                  "--container-mounts", "/scratch:/scratch")
    srun = next(line for line in proc.stdout.splitlines() if line.startswith("srun "))
    assert f"--container-image=/img/and_dist.sqsh --container-mounts={tmp_path}:{tmp_path},/scratch:/scratch " \
           "/opt/venv/bin/python -u -m submitit.core._submit" in srun, srun


@pytest.mark.slow
@pytest.mark.parametrize("args,needle", [
    (["model.arch=resnet9000"], "model.arch"),
    (["train.lrr=0.1"], "train.lrr"),
    (["--sweep", "train.lr"], "KEY=V1,V2"),
    (["--gpus-per-node", "2", "--tasks-per-node", "3"], "one task per GPU"),
    (["resume=/some/checkpoint"], "resume=auto"),
])
def test_bad_config_or_request_is_one_line_before_anything_is_submitted(tmp_path, args, needle):
    one_line_error(launch("--config", "demo", f"out_dir={tmp_path}", *args), needle)
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------ on the cluster

@pytest.mark.slow
@needs_cluster
@pytest.mark.parametrize("args,needle", [
    (["--partition", "nosuch"], "unknown partition 'nosuch'"),
    (["--gpus-per-node", "64"], "at most"),
    (["--nodes", "99"], "--nodes 99"),
    (["--constraint", "nosuchfeature"], "sbatch refused the job"),
])
def test_a_request_the_cluster_cannot_run_fails_in_one_line(tmp_path, args, needle):
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    one_line_error(launch("--config", "demo", f"out_dir={tmp_path}", "--cpus-per-task", "1", *args), needle)
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout == before


@pytest.fixture(scope="module")
def two_task_job(tmp_path_factory, local_reference):
    """TINY as a 2-task job, with a dependent probe job when and_dist.probe exists."""
    out = tmp_path_factory.mktemp("slurm")
    then = ["--then", "probe", *PROBE] if find_spec("and_dist.probe") else []
    # torchrun variables left in the submitting shell must not override SLURM's placement
    proc = launch("--config", "demo", *TINY, f"out_dir={out}", *TWO_TASKS, *then, cwd=out,
                  env={"WORLD_SIZE": "1", "RANK": "0", "MASTER_PORT": "1"})
    jobs = submitted(proc)
    kind, job, run, log = jobs[0]
    return {"proc": proc, "jobs": jobs, "info": wait_job(job, log), "out": out}


@pytest.mark.slow
@needs_cluster
def test_a_two_task_job_trains_exactly_like_one_local_process(two_task_job, local_reference):
    kind, job, run, log = two_task_job["jobs"][0]
    info = two_task_job["info"]
    assert info["JobState"] == "COMPLETED" and info["NumTasks"] == "2", _tail(log)
    assert "2 ranks" in log.read_text()
    assert_same_results(run, local_reference)                 # per-round rows, losses, kNN
    assert (run / "submitted.yaml").exists() and (run / "summary.json").exists()
    # the batch script a dry run prints is the one that was submitted
    dry = launch("--config", "demo", *TINY, f"out_dir={two_task_job['out']}", *TWO_TASKS, "--dry-run")
    script = dry.stdout.split("# ---- batch script\n")[1].split("\n# ----")[0]
    assert script.strip() == (log.parent / f"{job}_submission.sh").read_text().strip()


@pytest.mark.slow
@needs_cluster
@pytest.mark.skipif(find_spec("and_dist.probe") is None, reason="and_dist.probe is not in this tree yet")
def test_the_probe_job_runs_after_pretraining_on_its_checkpoint(two_task_job):
    (_, train_job, run, _), (kind, probe_job, probe_run, log) = two_task_job["jobs"]
    assert kind == "probe" and probe_run == run
    info = wait_job(probe_job, log, timeout=120)
    assert info["JobState"] == "COMPLETED", _tail(log)
    assert info["Dependency"] == "(null)" or "afterok" in info["Dependency"]
    assert info["StartTime"] >= two_task_job["info"]["EndTime"]       # ISO times compare as strings
    probes = json.loads((run / "probes.json").read_text())
    assert "features" in probes["layers"]


@pytest.mark.slow
@needs_cluster
def test_usr2_mid_epoch_checkpoints_requeues_and_resumes_to_the_same_result(tmp_path, local_reference):
    proc = launch("--config", "demo", *TINY, f"out_dir={tmp_path}", *TWO_TASKS, "log.wandb_mode=offline",
                  cwd=tmp_path)
    [(_, job, run, log)] = submitted(proc)
    seen = signal_during_training(job, run, log)
    info = wait_job(job, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", _tail(log)
    stop = re.search(r"stopped by signal 12 at round (\d+) epoch (\d+) step (\d+)", text)
    assert stop, _tail(log)
    r, e, s = stop.groups()
    # the requeued job resumed from exactly that step boundary: nothing lost, nothing repeated
    assert f"checkpoints/r{r}-e{e}-s{s} at round {r} epoch {e} step {s}" in text
    steps = [ev["step"] for ev in events(run, "step")]
    assert steps == list(range(1, len(steps) + 1))
    assert steps[-1] == events(local_reference, "step")[-1]["step"]
    stopped_at = 10 * (2 * int(r) + int(e)) + int(s)                   # 10 steps per epoch (300 / 32)
    assert seen <= stopped_at                                          # stopped after the signal came
    assert_same_results(run, local_reference)
    # the same wandb run continued
    ids = {p.name.rsplit("-", 1)[-1] for p in (run / "wandb").glob("offline-run-*")}
    assert len(ids) == 1, ids


def signal_during_training(job: str, run: Path, log: Path, sig: str = "USR2", after_steps: int = 3) -> int:
    """Send `sig` to the job's tasks once `after_steps` steps are logged; the steps seen by then."""
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() or len(events(run, "step")) < after_steps:
        assert job_info(job).get("JobState") in ("PENDING", "RUNNING") and time.time() < deadline, _tail(log)
        time.sleep(0.05)
    seen = len(events(run, "step"))
    subprocess.run(["scancel", f"--signal={sig}", job], check=True, timeout=30)
    return seen


@pytest.mark.slow
@needs_cluster
def test_requeues_are_bounded_by_max_requeues(tmp_path):
    proc = launch("--config", "demo", *TINY, f"out_dir={tmp_path}", "--cpus-per-task", "1", "--time", "10",
                  "slurm.max_requeues=0", cwd=tmp_path)
    [(_, job, run, log)] = submitted(proc)
    signal_during_training(job, run, log)
    info = wait_job(job, log)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", _tail(log)
    assert "not requeued: 0 of at most 0 requeues used" in log.read_text()
    assert re.search(r"checkpoints/r\d-e\d-s\d+\n", log.read_text())         # it saved before it ended


@pytest.mark.slow
@needs_cluster
def test_a_run_that_fails_is_not_requeued(tmp_path):
    images = tmp_path / "images"
    for split in ("train/cat", "test/cat"):
        (images / split).mkdir(parents=True)           # passes the launcher's checks, has no images
    proc = launch("--config", "demo", "data.source=imagefolder", f"data.root={images}", f"out_dir={tmp_path}",
                  "--cpus-per-task", "1", "--time", "10", cwd=tmp_path)
    [(_, job, run, log)] = submitted(proc)
    info = wait_job(job, log, timeout=90)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", _tail(log)
    assert "failed with exit status 2" in log.with_suffix(".err").read_text()


@pytest.mark.slow
@needs_cluster
def test_a_sweep_is_one_job_array_with_a_named_run_per_value(tmp_path):
    short = [o for o in TINY if not o.startswith(("curriculum.rounds", "train.epochs_per_round"))]
    proc = launch("--config", "demo", *short, "curriculum.rounds=1", "train.epochs_per_round=1",
                  f"out_dir={tmp_path}", "--cpus-per-task", "1", "--time", "10",
                  "--sweep", "train.lr=0.01,0.1", cwd=tmp_path)
    jobs = submitted(proc)
    assert [j.rsplit("_", 1)[1] for _, j, _, _ in jobs] == ["0", "1"]
    assert len({j.split("_")[0] for _, j, _, _ in jobs}) == 1                 # one array
    losses = []
    for (_, job, run, log), lr in zip(jobs, ("0.01", "0.1")):
        assert wait_job(job, log)["JobState"] == "COMPLETED", _tail(log)
        assert run.parent.name == f"demo-train.lr-{lr}"
        assert f"lr: {lr}" in (run / "config.yaml").read_text()
        losses.append(events(run, "epoch")[0]["loss"])
    assert losses[0] != losses[1]
