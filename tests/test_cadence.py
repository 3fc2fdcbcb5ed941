"""When the trainer evaluates, checkpoints and logs, against what the config asks: eval.every_epochs,
checkpoint.every_epochs and log.every_steps count finished epochs and steps of each round, and a
round's last epoch is always evaluated. One small in-process run."""
import json

from helpers import train_here

RUN = ["data.demo_train=30", "data.demo_test=20", "train.batch_size=15", "train.epochs_per_round=3",
       "curriculum.rounds=2", "eval.every_epochs=2", "eval.knn_k=5", "checkpoint.every_epochs=2",
       "checkpoint.keep=10", "log.every_steps=4", "train.threads=1", "log.progress=false"]


def test_evaluation_checkpoints_and_step_lines_follow_their_settings(tmp_path):
    run, _, summary = train_here("demo", RUN + [f"run_dir={tmp_path / 'run'}"])
    assert summary is not None
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    of = lambda kind, *keys: [tuple(e[k] for k in keys) for e in events if e["event"] == kind]
    # 2 steps an epoch: epochs 0, 1, 2 of each round end at steps 2, 4, 6 and 8, 10, 12
    assert of("epoch", "round", "epoch", "step") == [(0, 0, 2), (0, 1, 4), (0, 2, 6), (1, 0, 8), (1, 1, 10), (1, 2, 12)]
    assert of("knn", "round", "epoch", "step") == [(0, 1, 4), (0, 2, 6), (1, 1, 10), (1, 2, 12)]
    assert [s for (s,) in of("step", "step")] == [4, 8, 12]
    saved = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert saved == ["r0-e2-s0", "r0-end", "r1-e2-s0", "r1-end"]
