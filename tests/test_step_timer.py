"""The input-stall split: how much of the step time waited for data, on every epoch line and event."""
import json
import re
import time

import pytest
import torch

from and_dist import train
from and_dist.data.cached import CachedData
from and_dist.run.step_timer import StepTimer, describe_split


def _slow(items, seconds):
    for item in items:
        time.sleep(seconds)
        yield item


def test_waits_and_compute_are_split_per_step():
    timer = StepTimer(torch.device("cpu"))
    for _ in timer.batches(_slow(range(5), 0.03)):
        time.sleep(0.01)
    split = timer.split()
    # sleeps only ever overshoot on a loaded machine: lower bounds, and the share as measured
    assert split["data_wait_ms"] >= 30 and split["compute_ms"] >= 10
    assert split["data_wait_ms"] + split["compute_ms"] == split["step_ms"]
    assert abs(split["data_wait_share"] - split["data_wait_ms"] / split["step_ms"]) < 1e-3
    assert re.fullmatch(r"data wait \d+% \(\d+\.\d of \d+\.\d ms/step\)", describe_split(split))
    empty = timer.split()                                  # nothing since the last split
    assert all(v != v for v in empty.values()) and describe_split(empty) == "data wait -"


def _run(tmp_path, name, capsys, *extra):
    run = tmp_path / name
    status = train.main(["--config", "demo", f"run_dir={run}", "data.demo_train=256", "data.demo_test=64",
                         "train.batch_size=64", "curriculum.rounds=1", "train.epochs_per_round=2",
                         "eval.every_epochs=0", "checkpoint.every_epochs=0", "eval.knn_k=5",
                         "log.progress=false", "train.threads=1", "data.prefetch=0", *extra])
    out = capsys.readouterr().out
    assert status == 0, out
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [e for e in events if e["event"] == "epoch"], out


@pytest.mark.slow
def test_a_slow_data_source_shows_in_every_epoch_line_and_event(tmp_path, capsys, monkeypatch):
    fast, _ = _run(tmp_path, "fast", capsys)
    build = CachedData._build
    monkeypatch.setattr(CachedData, "_build", lambda self, *a: _slow(build(self, *a), 0.4))
    slow, out = _run(tmp_path, "slow", capsys)
    lines = re.findall(r"epoch \d: .* img/s, data wait (\d+)% \(([\d.]+) of ([\d.]+) ms/step\)", out)
    assert len(lines) == len(slow) == 2
    for e, (share, wait, step) in zip(slow, lines):
        assert e["data_wait_ms"] >= 0.99 * 400 and e["data_wait_share"] > 0.3   # built in the step: all of it waits
        assert abs(e["data_wait_ms"] + e["compute_ms"] - e["step_ms"]) < 1e-6
        assert abs(e["step_ms"] * 4 / 1e3 - e["seconds"]) < 0.1 * e["seconds"]   # 4 steps fill the epoch
        assert int(share) == round(100 * e["data_wait_share"]) and float(step) == round(e["step_ms"], 1)
    for e in fast:
        assert e["data_wait_share"] < min(s["data_wait_share"] for s in slow)
        assert abs(e["data_wait_ms"] + e["compute_ms"] - e["step_ms"]) < 1e-6
