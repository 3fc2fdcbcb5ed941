"""The one reader of a checkpoint's contents (run/contents.RunState) against what the trainer that
saved it held: config, progress, weights, log state and the bank, whole and in slices that cross
the saved parts; and the one reader of metrics events (platform/log.read_events). One small
in-process run; the bank split in parts as three ranks would save it."""
import copy
import json

import torch

from helpers import train_here

from and_dist.method.bank import ShardedBank
from and_dist.platform.log import read_events
from and_dist.run import checkpoint
from and_dist.run.contents import RunState

RUN = ["data.demo_train=40", "data.demo_test=20", "train.batch_size=20", "train.epochs_per_round=1",
       "curriculum.rounds=2", "eval.knn_k=5", "train.threads=1", "log.progress=false", "train.lr=0.07",
       "bank.momentum=0.3"]


def test_run_state_reads_back_what_the_trainer_saved(tmp_path):
    run, trainer, _ = train_here("demo", RUN + [f"run_dir={tmp_path / 'run'}"])
    saved = RunState(checkpoint.resolve(run))
    cfg = saved.config()
    assert (cfg.train.lr, cfg.bank.momentum, cfg.curriculum.rounds) == (0.07, 0.3, 2)
    p = trainer.progress
    assert saved.global_step == p.global_step == 4 and saved.progress["round"] == p.round
    model = {k.removeprefix("module."): v for k, v in trainer.model.state_dict().items()}
    assert saved.weights.keys() == model.keys()
    assert all(torch.equal(saved.weights[k], model[k]) for k in model)
    assert saved.log["wandb_id"] == trainer.log.wandb_id and 0 < saved.log["metrics_lines"] <= trainer.log.state_dict()["metrics_lines"]
    rows = trainer.bank.state_dict()["rows"]
    assert saved.bank_rows() == 40 and len(saved.bank_files()) == 1
    assert torch.equal(saved.bank_slice(40, 0, 40), rows)
    model, bank = copy.deepcopy(trainer.model), ShardedBank(40, trainer.bank.dim, momentum=0.3, seed=7)
    for t in model.state_dict().values():
        t.zero_()
    saved.restore({"model": model, "bank": bank})                  # what a resume does, state.pt read once
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in model.state_dict().items())
    assert torch.equal(bank.state_dict()["rows"], rows)


def test_bank_slices_are_cut_from_every_saved_part(tmp_path):
    """Parts of 14, 13 and 13 rows (three ranks' shards): any [lo, hi) is the same rows of the
    whole, a wrong N is refused, and a checkpoint without a bank says so with None."""
    whole = torch.randn(40, 8)
    parts = {"bank-0.pt": (0, 14), "bank-1.pt": (14, 27), "bank-2.pt": (27, 40)}
    listing = {}
    for name, (lo, hi) in parts.items():
        torch.save({"n": 40, "lo": lo, "rows": whole[lo:hi].clone()}, tmp_path / name)
        listing[name] = {}
    (tmp_path / checkpoint.MANIFEST).write_text(json.dumps({"files": listing}))
    saved = RunState(tmp_path)
    assert saved.bank_rows() == 40
    for lo, hi in [(0, 40), (10, 30), (13, 15), (27, 28), (39, 40)]:
        assert torch.equal(saved.bank_slice(40, lo, hi), whole[lo:hi]), (lo, hi)
    try:
        saved.bank_slice(41, 0, 10)
        raise AssertionError("a bank of another N was read")
    except Exception as e:
        assert "40 rows" in str(e) and "41 samples" in str(e)
    (tmp_path / checkpoint.MANIFEST).write_text('{"files": {"state.pt": {}}}')
    assert RunState(tmp_path).bank_slice(40, 0, 40) is None and RunState(tmp_path).bank_rows() is None


def test_read_events_filters_by_kind_and_skips_a_line_being_written(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert read_events(run) == [] and read_events(run, "epoch") == []          # no file yet
    lines = [{"event": "epoch", "round": 0, "loss": 2.0}, {"event": "knn", "round": 0}, {"event": "epoch", "round": 1}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"event": "epo')
    assert read_events(run) == lines
    assert read_events(run, "epoch") == [lines[0], lines[2]]
    assert read_events(run, "knn", "epoch") == lines and read_events(run, "round") == []
