"""and_dist.compare: arms branched per seed from a shared base, the table's statistics, a SIGTERM
in the middle of an arm and the rerun that continues it to the uninterrupted numbers."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ENV, events

from and_dist.compare import main, markdown, mean_sd, parse_arms, arm_table

REPO = Path(__file__).parent.parent
# 200 images, batches of 50: 4 steps an epoch, 2 epochs a round; round 0 in the base, round 1 in each arm
TINY = ["--config", "demo", "name=c", "data.demo_train=200", "data.demo_test=50", "curriculum.rounds=2",
        "train.epochs_per_round=2", "train.batch_size=50", "eval.knn_k=10", "eval.every_epochs=0",
        "train.threads=1", "log.progress=false", "log.every_steps=1"]


def compare(out: Path, seeds: str, **popen):
    cmd = [sys.executable, "-m", "and_dist.compare", "--arms", "and,instance", "--seeds", seeds, *TINY,
           f"out_dir={out}"]
    kw = dict(cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**ENV, "CUDA_VISIBLE_DEVICES": ""})
    return subprocess.Popen(cmd, **kw, **popen)


def summary_rounds(run: Path) -> list[dict]:
    return json.loads((run / "summary.json").read_text())["rounds"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("compare")
    proc = compare(out, "0,1")
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout + stderr
    return out / "c", stdout


# ---------------------------------------------------------------------------- the statistics

def test_mean_and_sample_sd_over_seeds():
    assert mean_sd([1, 2, 3]) == {"mean": 2.0, "sd": 1.0, "n": 3}
    assert mean_sd([5]) == {"mean": 5.0, "sd": None, "n": 1}            # one seed: no spread
    assert mean_sd([None, 4, 6]) == pytest.approx({"mean": 5.0, "sd": 2 ** 0.5, "n": 2})
    assert mean_sd([None]) == {"mean": None, "sd": None, "n": 0}


def test_the_table_has_one_row_per_arm_and_round_with_each_metric_over_seeds():
    run = lambda k, a, c: {0: {"knn_top1": k, "anchor_consistency": None, "all_consistency": None},
                           1: {"knn_top1": k + 10, "anchor_consistency": a, "all_consistency": c}}
    rows = arm_table({"and": [run(10, 0.5, 0.2), run(12, 0.7, 0.4), run(14, 0.6, 0.3)], "instance": [run(10, None, 0.1)]})
    assert [(r["arm"], r["round"]) for r in rows] == [("and", 0), ("and", 1), ("instance", 0), ("instance", 1)]
    assert rows[1]["knn_top1"] == {"mean": 22.0, "sd": 2.0, "n": 3}
    assert rows[1]["anchor_consistency"] == pytest.approx({"mean": 0.6, "sd": 0.1, "n": 3})
    assert rows[3]["anchor_consistency"] == {"mean": None, "sd": None, "n": 0}
    md = markdown(rows, "t").splitlines()
    assert "| 1 | and | 22.00 ± 2.00 (n=3) | 0.600 ± 0.100 (n=3) | 0.300 ± 0.100 (n=3) |" in md
    assert "| 1 | instance | 20.00 (n=1) | - | 0.100 (n=1) |" in md


def test_arms_are_presets_or_named_settings():
    assert parse_arms("and,instance,k3:curriculum.neighbours=3,data.crop_scale=[0.2,1.0]") == {
        "and": ["curriculum.method=and"], "instance": ["curriculum.method=instance"],
        "k3": ["curriculum.neighbours=3", "data.crop_scale=[0.2,1.0]"]}


@pytest.mark.parametrize("args, says", [
    (["--arms", "and,bogus"], "unknown arm 'bogus'"),
    (["--arms", "and,and"], "used twice"),
    (["--arms", "and,curriculum.neighbours=3"], "follows no NAME:key=value arm"),
    (["--arms", "and,big:model.low_dim=64"], "stay the base's"),
    (["--seeds", "0,x"], "expected integers"),
    (["run_dir=/tmp/x"], "compare chooses run_dir"),
    (["curriculum.rounds=1"], "leaves nothing after the branch"),
])
def test_mistakes_are_one_line_exit_2_before_any_run(tmp_path, capsys, args, says):
    with pytest.raises(SystemExit) as e:
        main([*TINY, f"out_dir={tmp_path}", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and says in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_print_commands_prints_each_run_bases_first_and_runs_nothing(tmp_path, capsys):
    assert main([*TINY, f"out_dir={tmp_path}", "--seeds", "0,1", "--print-commands"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and all(l.startswith("python -m and_dist.train --config demo") for l in lines)
    assert "curriculum.rounds=1" in lines[0] and f"run_dir={tmp_path / 'c' / 'seed0' / 'base'}" in lines[0]
    assert f"init_from={tmp_path / 'c' / 'seed0' / 'base' / 'checkpoints' / 'r0-end'}" in lines[1]
    assert "curriculum.method=instance" in lines[2] and "train.seed=1" in lines[3]
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------- the runs

@pytest.mark.slow
def test_every_arm_branches_from_its_seeds_base_and_the_table_is_their_statistics(compared):
    root, stdout = compared
    result = json.loads((root / "compare.json").read_text())
    assert result["arms"] == ["and", "instance"] and result["seeds"] == [0, 1]
    assert (root / "compare.png").stat().st_size > 10_000 and "| 1 | and |" in (root / "compare.md").read_text()
    rows = {(r["arm"], r["round"]): r for r in result["rows"]}
    assert sorted(rows) == [("and", 0), ("and", 1), ("instance", 0), ("instance", 1)]
    for s in (0, 1):
        base = summary_rounds(root / f"seed{s}" / "base")
        for arm in ("and", "instance"):
            run = root / f"seed{s}" / arm
            assert [r["round"] for r in summary_rounds(run)] == [0, 1] and summary_rounds(run)[0] == base[0]
            assert [e["round"] for e in events(run, "discovery")] == [1]     # round 1 only, on the loaded bank
    for arm in ("and", "instance"):
        knn = [summary_rounds(root / f"seed{s}" / arm)[1]["knn_top1"] for s in (0, 1)]
        assert rows[(arm, 1)]["knn_top1"] == pytest.approx(mean_sd(knn))
        all_cons = [events(root / f"seed{s}" / arm, "diagnostics")[0]["all_consistency"] for s in (0, 1)]
        assert rows[(arm, 1)]["all_consistency"] == pytest.approx(mean_sd(all_cons))
    assert rows[("and", 1)]["anchor_consistency"]["n"] == 2 and rows[("instance", 1)]["anchor_consistency"]["n"] == 0
    assert rows[("and", 0)]["knn_top1"] == rows[("instance", 0)]["knn_top1"]   # one shared round 0


@pytest.mark.slow
def test_sigterm_in_the_middle_of_an_arm_exits_143_and_the_rerun_continues_it(compared, tmp_path):
    proc = compare(tmp_path, "0")
    arm = tmp_path / "c" / "seed0" / "and"
    deadline = time.time() + 300
    while not any(e["round"] == 1 for e in events(arm, "step")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stdout + stderr
    assert "Traceback" not in stdout + stderr and not (arm / "summary.json").exists()
    assert not (tmp_path / "c" / "compare.json").exists()
    again = compare(tmp_path, "0")
    stdout, stderr = again.communicate(timeout=600)
    assert again.returncode == 0, stdout + stderr
    assert "seed 0, base: finished, skipped" in stdout and f"resuming {arm / 'checkpoints'}" in stdout
    for name in ("and", "instance"):                         # the uninterrupted run's numbers
        assert summary_rounds(tmp_path / "c" / "seed0" / name) == summary_rounds(compared[0] / "seed0" / name)
    rows = json.loads((tmp_path / "c" / "compare.json").read_text())["rows"]
    assert all(r["knn_top1"]["n"] == 1 and r["knn_top1"]["sd"] is None for r in rows)


def test_a_multi_rank_launch_is_refused_with_the_way_to_run_it(tmp_path, capsys, monkeypatch):
    """A second process group in one process hangs at its rendezvous: each rank would wait."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        main([*TINY, f"out_dir={tmp_path}"])
    assert e.value.code == 2 and "--print-commands" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
