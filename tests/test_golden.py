"""The trainer against the algorithm written out by hand, not against another run of itself.

One process, float64, the trainer built exactly as `train` builds it, with settings that differ
from every default (bank temperature and momentum, SGD lr, momentum, Nesterov, weight decay), so
a setting lost on its way to the bank or the optimizer shows. The trainer's own loop runs two
rounds of two steps; before each step a reference written from the paper's formulas takes the
same step from its own copy of the state:
  features   f = model(x)                            (the reference's own copy of the weights)
  loss       -log(p_ii + sum_{j in N(i)} p_ij),  p_i = softmax(f_i . V / T), anchors only use N(i)
  lr         lr x gamma from epoch lr_first_decay on, back to lr at each round's start
  SGD        d = g + wd w;  b = mu b + d (b = d first);  d = d + mu b (Nesterov);  w = w - lr d
  bank       V_i = normalise(m V_i + (1 - m) f_i)    with this step's f, after the loss
  discovery  H_i = entropy of softmax(V_i . V / T); N(i) = nearest other row; the
             round(N x rate x r) lowest-entropy rows are anchors
and the trainer's loss, weights, bank and anchors must equal it.
"""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

from and_dist.config import load_config
from and_dist.platform import dist
from and_dist.run import rundir
from and_dist.run.stop import Stop
from and_dist.train import build_trainer

SETTINGS = {"bank.temperature": 0.07, "bank.momentum": 0.3, "train.lr": 0.05, "train.momentum": 0.8,
            "train.nesterov": True, "train.weight_decay": 1e-3, "curriculum.anchor_rate": 0.3,
            "train.schedule": "step", "train.lr_first_decay": 1, "train.lr_gamma": 0.2}
TINY = ["data.demo_train=30", "data.demo_test=20", "train.batch_size=15", "train.epochs_per_round=2",
        "curriculum.rounds=2", "train.dtype=float64", "eval.knn_k=10", "eval.every_epochs=0",
        "checkpoint.every_epochs=0", "train.threads=1", "log.progress=false", "discovery.kernel=exact"]


def golden_trainer(run_dir, *overrides):
    cfg = load_config("demo", TINY + [f"{k}={v}" for k, v in SETTINGS.items()] + [f"run_dir={run_dir}", *overrides])
    run, _ = rundir.choose(cfg.out_dir, cfg.name, cfg.run_dir, "")
    stop = Stop().__enter__()
    return build_trainer(cfg, dist.init("cpu"), run, None, stop), stop


def instance_or_anchor_loss(feats, bank, idx, anchor, neighbour, temperature):
    """-log of the softmax mass on i and, for an anchor, on its neighbour."""
    p = torch.softmax(feats @ bank.T / temperature, dim=1)
    rows = torch.arange(len(idx))
    mass = p[rows, idx]
    if anchor is not None:
        mass = mass + torch.where(anchor[idx], p[rows, neighbour[idx]], torch.zeros_like(mass))
    return -torch.log(mass)


def entropy_and_neighbour(bank, temperature):
    sims = bank @ bank.T
    p = torch.softmax(sims / temperature, dim=1)
    entropy = -(p * torch.log(p)).sum(1)
    return entropy, sims.fill_diagonal_(-2).argmax(1)


class Reference:
    """The hand-written algorithm, carrying its own weights, momentum buffers and bank."""

    def __init__(self, model, bank_rows):
        self.model, self.bank = copy.deepcopy(model), bank_rows.clone()
        self.buffers = {}
        self.anchor = self.neighbour = None

    def discover(self, round_, n):
        entropy, self.neighbour = entropy_and_neighbour(self.bank, SETTINGS["bank.temperature"])
        count = round(n * SETTINGS["curriculum.anchor_rate"] * round_)
        self.anchor = torch.zeros(n, dtype=torch.bool)
        self.anchor[entropy.argsort()[:count]] = True

    def step(self, images, idx, epoch):
        self.model.train()
        feats = self.model(images.double())
        loss = instance_or_anchor_loss(feats, self.bank, idx, self.anchor, self.neighbour,
                                       SETTINGS["bank.temperature"])
        params = [p for p in self.model.parameters()]
        grads = torch.autograd.grad(loss.mean(), params)
        lr, mu, wd = SETTINGS["train.lr"], SETTINGS["train.momentum"], SETTINGS["train.weight_decay"]
        lr *= SETTINGS["train.lr_gamma"] if epoch >= SETTINGS["train.lr_first_decay"] else 1.0
        with torch.no_grad():
            for n, (w, g) in enumerate(zip(params, grads)):
                d = g + wd * w
                b = self.buffers[n] = d.clone() if n not in self.buffers else mu * self.buffers[n] + d
                w -= lr * (d + mu * b)
            m = SETTINGS["bank.momentum"]
            self.bank[idx] = F.normalize(m * self.bank[idx] + (1 - m) * feats.detach(), dim=1)
        return feats.detach(), loss.detach()


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory):
    """The trainer's loop and the reference, step by step; what each saw and computed."""
    trainer, stop = golden_trainer(tmp_path_factory.mktemp("golden") / "run")
    ref = Reference(trainer.model, trainer.bank.rows)
    real_step, seen = trainer.step, []

    def step(batch):
        r = trainer.progress.round
        if r > 0 and ref.anchor is None:
            ref.discover(r, trainer.bank.n)
        feats, ref_loss = ref.step(batch.images, batch.index, trainer.progress.epoch)
        loss = real_step(batch)
        seen.append({"round": r, "index": batch.index.clone(), "feats": feats, "ref_loss": ref_loss,
                     "loss": loss.item(), "weights": copy.deepcopy(trainer.model.state_dict()),
                     "ref_weights": copy.deepcopy(ref.model.state_dict()), "bank": trainer.bank.rows.clone(),
                     "ref_bank": ref.bank.clone(), "anchor": trainer.curriculum.anchor,
                     "neighbours": None if trainer.curriculum.nbhd is None else trainer.curriculum.nbhd.neighbours})
        return loss

    trainer.step = step
    try:
        summary = trainer.run()
    finally:
        trainer.log.close()
        stop.__exit__(None, None, None)
    assert summary is not None
    return seen, ref, trainer.run_dir


def test_the_loop_ran_two_rounds_of_two_epochs_of_two_steps(golden_run):
    seen, ref, _ = golden_run
    assert [s["round"] for s in seen] == [0] * 4 + [1] * 4
    assert ref.anchor.sum() == 9                           # round(30 x 0.3 x 1)


def test_each_step_loss_is_the_papers_formula(golden_run):
    seen, _, _ = golden_run
    for s in seen:
        assert s["feats"].norm(dim=1) == pytest.approx(torch.ones(len(s["feats"]), dtype=torch.float64), abs=1e-12)
        assert s["loss"] == pytest.approx(s["ref_loss"].mean().item(), rel=1e-10, abs=1e-12)


def test_the_weights_follow_nesterov_sgd_with_weight_decay(golden_run):
    seen, _, _ = golden_run
    for s in seen:
        for name, w in s["weights"].items():
            assert torch.allclose(w.double(), s["ref_weights"][name].double(), rtol=1e-9, atol=1e-11), name


def test_the_bank_follows_the_momentum_rule_with_this_steps_features(golden_run):
    seen, _, _ = golden_run
    for s in seen:
        assert torch.allclose(s["bank"], s["ref_bank"], rtol=0, atol=1e-11)
        untouched = torch.ones(len(s["bank"]), dtype=torch.bool)
        untouched[s["index"]] = False
        assert untouched.sum() == 15


def test_discovery_makes_the_lowest_entropy_rows_anchors_with_their_nearest_row(golden_run):
    seen, ref, _ = golden_run
    round1 = [s for s in seen if s["round"] == 1]
    assert torch.equal(round1[0]["anchor"], ref.anchor)
    assert torch.equal(round1[0]["neighbours"][:, 0], ref.neighbour)
    # anchors change the loss: in round 1 the anchors' positive mass includes their neighbour
    anchors = ref.anchor[round1[0]["index"]]
    assert 0 < anchors.sum() < len(anchors)


def test_each_epoch_line_is_the_mean_of_its_steps_losses(golden_run):
    seen, _, run = golden_run
    epochs = [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["event"] == "epoch"]
    steps = [s["loss"] for s in seen]
    assert [e["loss"] for e in epochs] == pytest.approx([sum(steps[i:i + 2]) / 2 for i in range(0, 8, 2)], rel=1e-12)
