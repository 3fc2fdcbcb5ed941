"""The trainer end to end on the embedded demo set, at a reduced budget, plus its CLI contract."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import main_here

from and_dist import train
from and_dist.run import rundir
from and_dist.config import load_config
from and_dist.data.sampler import global_batches
from and_dist.training.trainer import lr_at

REPO = Path(__file__).parent.parent


def run_train(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "and_dist.train", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout, env={"PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin",
                                                                      "OMP_NUM_THREADS": "1", "HOME": "/tmp"})


@pytest.fixture(scope="module")
def demo_run(finished_demo_run):
    """conftest's finished 3-round demo run (500 train / 200 test images, 2 epochs a round)."""
    return finished_demo_run


@pytest.mark.slow
def test_demo_prints_the_round_table(demo_run):
    run, stdout = demo_run
    table = stdout[stdout.rindex("round  anchors  consistency  kNN top-1"):].splitlines()
    assert [line.split()[:2] for line in table[1:4]] == [["0", "0"], ["1", "125"], ["2", "250"]]
    assert "final kNN" in stdout and "picked on the test set" in stdout


@pytest.mark.slow
def test_run_directory_holds_config_metrics_summary_checkpoint_and_wandb(demo_run):
    run, _ = demo_run
    assert load_config(str(run / "config.yaml"), []).curriculum.rounds == 3
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    kinds = {e["event"] for e in events}
    assert {"step", "epoch", "knn", "discovery", "round", "final"} <= kinds
    steps = [e for e in events if e["event"] == "step"]
    assert len(steps) == 3 * 2 * 4 and all({"round", "epoch", "step", "loss", "lr"} <= e.keys() for e in steps)
    disc = [e for e in events if e["event"] == "discovery"]
    assert [e["anchors"] for e in disc] == [125, 250] and all(0 <= e["consistency"] <= 1 for e in disc)
    diag = [e for e in events if e["event"] == "diagnostics"]         # AND's diagnostic, every discovery
    assert [e["round"] for e in diag] == [1, 2] and [e["anchors"] for e in diag] == [125, 250]
    assert all(0 <= e[f"decile{b}_consistency"] <= 1 for e in diag for b in range(1, 11))
    assert [e["anchor_consistency"] for e in diag] == pytest.approx([e["consistency"] for e in disc])
    assert all((run / f"consistency-round{r}.png").stat().st_size > 10_000 for r in (1, 2))
    summary = json.loads((run / "summary.json").read_text())
    assert 0 <= summary["final_knn_top1"] <= 100 and "test set" in summary["best_note"]
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == "r2-end" and (run / "checkpoints" / latest / "state.pt").exists()
    assert any((run / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_load_model_rebuilds_the_trained_model_from_a_run_directory(demo_run):
    import torch
    from and_dist.run import checkpoint
    from and_dist.eval.pretrained import load_model
    run, _ = demo_run
    model, cfg, ckpt = load_model(run)
    assert cfg.name == "small" and cfg.model.arch == "convnet_small" and ckpt.name == "r2-end"
    saved = checkpoint.read_state(ckpt)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert not model.training and model(torch.rand(2, 3, 32, 32)).shape == (2, 128)
    assert load_model(run / "checkpoints" / "r2-end")[2] == ckpt


@pytest.mark.parametrize("args,needle", [
    (["train.epochs_per_rnd=2"], "did you mean 'train.epochs_per_round'"),
    (["train.batch_size=abc"], "expects int"),
    (["data.source=imagefolder", "data.root=/nonexistent/imagenet"], "data.root"),
])
def test_bad_input_exits_2_with_one_line(args, needle, capsys):
    proc = main_here(capsys, train.main, "--config", "demo", *args)     # the exit status itself: test_runs
    assert proc.returncode == 2
    assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr


def test_step_schedule_restarts_every_round():
    cfg = load_config("cifar10_resnet18", ["data.source=demo"])
    assert [lr_at(cfg, e) for e in (0, 79, 80, 119, 120, 160)] == pytest.approx(
        [0.03, 0.03, 0.003, 0.003, 0.0003, 0.00003])
    cfg = load_config("demo", ["train.schedule=cosine", "train.epochs_per_round=10"])
    assert lr_at(cfg, 0) == pytest.approx(cfg.train.lr) and lr_at(cfg, 5) == pytest.approx(cfg.train.lr / 2)


def test_global_batches_cover_every_sample_once_and_depend_only_on_seed_round_epoch():
    a = global_batches(1000, 128, 3, seed=0, round_=1, epoch=2)
    assert sorted(int(i) for b in a for i in b) == list(range(1000))
    assert all(x.equal(y) for x, y in zip(a, global_batches(1000, 128, 1, 0, 1, 2)))
    assert not a[0].equal(global_batches(1000, 128, 3, 0, 1, 3)[0])


@pytest.mark.slow
def test_fresh_runs_never_overwrite_each_other_and_resume_auto_finds_the_latest(tmp_path):
    args = ["--config", "demo", f"out_dir={tmp_path}", "name=again", "data.demo_train=200",
            "data.demo_test=50", "curriculum.rounds=1", "train.epochs_per_round=1", "eval.knn_k=10",
            "train.threads=1", "log.every_steps=1"]
    procs = [run_train(*args) for _ in range(2)]
    assert all(proc.returncode == 0 for proc in procs), [proc.stderr for proc in procs]
    first, second = rundir.runs_of(tmp_path / "again")
    for run, proc in ((first, procs[0]), (second, procs[1])):
        events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert sum(e["event"] == "step" for e in events) == 2  # 200 samples / 128: one run's two steps
        assert (run / "checkpoints" / "r0-end" / "state.pt").exists() and (run / "summary.json").exists()
        assert f"run directory {run}" in proc.stdout and "fresh run" in proc.stdout
    proc = run_train(*args, "resume=auto", "curriculum.rounds=2")
    assert proc.returncode == 0, proc.stderr
    assert f"run directory {second}" in proc.stdout and "resuming" in proc.stdout
    assert rundir.runs_of(tmp_path / "again") == [first, second]
    assert len(json.loads((second / "summary.json").read_text())["rounds"]) == 2
    assert len(json.loads((first / "summary.json").read_text())["rounds"]) == 1
