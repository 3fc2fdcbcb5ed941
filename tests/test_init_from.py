"""init_from: a new run built from a finished run holds its weights and bank at its first step and
starts at its next round; a weights file gives weights only; every mismatch is one line, exit 2,
and leaves no run behind. (A branch trained to the end, stopped and resumed: test_compare.py.)"""
from pathlib import Path

import pytest
import torch
from helpers import final_bank, main_here

from and_dist.config import load_config
from and_dist.platform import dist
from and_dist.run import checkpoint, rundir
from and_dist.run.stop import Stop
from and_dist import train as entry
from and_dist.train import build_trainer

pytestmark = pytest.mark.slow          # every test here starts processes (or uses a fixture that does)

TINY = ["--config", "demo", "data.demo_train=500", "data.demo_test=50", "train.epochs_per_round=1",
        "train.batch_size=100", "eval.knn_k=10", "eval.every_epochs=0", "train.threads=1", "log.progress=false"]


@pytest.fixture(scope="module")
def source(finished_demo_run) -> Path:
    """conftest's finished demo run: 3 rounds, 500 train images, its last checkpoint r2-end."""
    return finished_demo_run[0]


def built(tmp_path: Path, *overrides: str):
    """The trainer train.build_trainer makes for a fresh run with these overrides (nothing trained yet)."""
    cfg = load_config("demo", [o for o in TINY[2:]] + [f"run_dir={tmp_path / 'new'}", *overrides])
    run, _ = rundir.choose(cfg.out_dir, cfg.name, cfg.run_dir, "")
    with Stop() as stop:
        trainer = build_trainer(cfg, dist.init("cpu"), run, None, stop)
    trainer.log.close()
    return trainer


def test_a_branch_starts_with_the_source_weights_and_bank_at_its_next_round(source, tmp_path):
    trainer = built(tmp_path, f"init_from={source}", "curriculum.rounds=5")
    saved = checkpoint.read_state(source / "checkpoints" / "r2-end")
    assert all(torch.equal(v, saved["model"][k]) for k, v in trainer.model.state_dict().items())
    assert torch.equal(trainer.bank.rows, final_bank(source))
    p = trainer.progress
    assert (p.round, p.epoch, p.step, p.global_step) == (3, 0, 0, saved["progress"]["global_step"])
    assert p.rounds == saved["progress"]["rounds"]
    assert trainer.opt.state == {}                       # the optimizer is not carried


def test_a_weights_file_gives_the_weights_only(source, tmp_path):
    weights = tmp_path / "weights.pth"
    torch.save(checkpoint.read_state(source / "checkpoints" / "r2-end")["model"], weights)
    fresh = built(tmp_path / "a")
    trainer = built(tmp_path / "b", f"init_from={weights}")
    assert all(torch.equal(v, torch.load(weights)[k]) for k, v in trainer.model.state_dict().items())
    assert torch.equal(trainer.bank.rows, fresh.bank.rows) and trainer.progress.round == 0


@pytest.mark.parametrize("override, says", [
    ("model.arch=convnet_gn", "the source has model.arch='convnet_small', this run has model.arch='convnet_gn'"),
    ("model.low_dim=64", "the source has model.low_dim=128, this run has model.low_dim=64"),
    ("data.image_size=24", "the source has data.image_size=32, this run has data.image_size=24"),
    ("data.demo_train=300", "the source's memory bank has 500 rows, this run's data set has 300 train images"),
    ("curriculum.rounds=3", "nothing is left to train"),
])
def test_every_mismatch_is_one_line_exit_2_and_leaves_no_run(source, tmp_path, override, says, capsys):
    done = main_here(capsys, entry.main, *TINY, f"out_dir={tmp_path}", "name=branch", f"init_from={source}",
                     "curriculum.rounds=4", override)                 # in this process: see test_runs for the status
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert list((tmp_path / "branch").iterdir()) == []   # no run directory left for resume=auto to find
