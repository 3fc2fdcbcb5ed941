"""The label-free neighbourhood measures (method/label_free.py): mutual_rate, view_agreement and
round_stability, checked by hand on small neighbourhoods and against a brute-force search, and
logged at every discovery beside the labelled consistency (metrics.jsonl and wandb, offline)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import events, train_here, wandb_history
from PIL import Image

from and_dist.data.sampler import seed_of
from and_dist.method.label_free import VIEW_CHUNK, kept, mutual, view_neighbours, view_sample
from and_dist.platform import plots

DEMO = ["data.demo_train=300", "data.demo_test=60", "train.batch_size=50", "train.epochs_per_round=2",
        "curriculum.rounds=3", "curriculum.anchor_rate=0.2", "eval.knn_k=10", "eval.every_epochs=0",
        "checkpoint.every_epochs=0", "train.threads=1", "log.progress=false", "model.arch=convnet_gn",
        "discovery.kernel=exact", "discovery.view_sample=200", "curriculum.neighbours=2"]


def test_mutual_and_kept_by_hand():
    nbrs = torch.tensor([[1, 2], [0, 2], [0, 1], [2, 0]])       # 0<->1 mutual; 2 -> 0 -> 1; 3 -> 2 -> 0
    assert mutual(nbrs).tolist() == [1.0, 1.0, 0.0, 0.0]
    before = torch.tensor([[2, 3], [0, 3], [1, 0], [0, 1]])
    assert kept(before, nbrs).tolist() == [0.5, 0.5, 1.0, 0.5]   # pairs kept, in any order
    assert kept(None, nbrs).isnan().all()                       # the first discovery has nothing to keep


def test_view_sample_is_fixed_and_sized():
    s = view_sample(1000, 300, seed=3)
    assert len(s) == 300 and len(s.unique()) == 300 and torch.equal(s, view_sample(1000, 300, seed=3))
    assert len(view_sample(50, 300, seed=3)) == 50


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    run, trainer, summary = train_here("demo", DEMO + [f"run_dir={out / 'run'}", "log.wandb_mode=offline",
                                                      f"out_dir={out}"])
    assert summary is not None
    return run, trainer


def test_view_neighbours_equal_a_brute_force_search(demo_run):
    _, t = demo_run
    sample = view_sample(t.bank.n, 200, 0)
    found = view_neighbours(t.model, t.data, t.bank, sample, 0, 5, t.dtype)
    t.model.eval()
    with torch.no_grad():
        want = []
        for c, a in enumerate(range(0, len(sample), VIEW_CHUNK)):
            chunk = sample[a: a + VIEW_CHUNK]
            g = torch.Generator().manual_seed(seed_of(0, 5, c, 34))
            f = F.normalize(t.model(t.data.views(chunk, g, 0, len(chunk))), dim=1)
            sims = f @ t.bank.rows.T
            sims[torch.arange(len(chunk)), chunk] = -2              # its own row is left out
            want.append(sims.argmax(1))
    t.model.train()
    assert torch.equal(found, torch.cat(want))
    assert (found != sample).all()


def test_each_discovery_logs_the_label_free_measures_beside_the_consistency(demo_run):
    run, t = demo_run
    diag = events(run, "diagnostics")
    assert [d["round"] for d in diag] == [1, 2]
    for d in diag:
        assert d["view_sample"] == 200 and 0 <= d["mutual_rate"] <= 1 and 0 <= d["view_agreement"] <= 1
        assert d["all_consistency"] is not None and d["decile10_consistency"] is not None   # both kinds, one event
        assert {f"decile{k}_mutual_rate" for k in range(1, 11)} <= d.keys()
        assert d["anchor_mutual_rate"] is not None and d["rest_view_agreement"] is not None
        assert d["mutual_rate_seconds"] >= 0 and d["view_agreement_seconds"] > 0 and d["discovery_seconds"] > 0
    assert diag[0]["round_stability"] is None and 0 <= diag[1]["round_stability"] < 1   # against the previous one
    # the last discovery's numbers from its own neighbourhood
    nb = t.curriculum.nbhd
    assert diag[1]["mutual_rate"] == pytest.approx(mutual(nb.neighbours).mean().item())
    anchors = t.curriculum.anchor
    assert diag[1]["anchor_mutual_rate"] == pytest.approx(mutual(nb.neighbours)[anchors].mean().item())
    logged = [row for row in wandb_history(run) if "diagnostics/mutual_rate" in row]
    assert [row["diagnostics/mutual_rate"] for row in logged] == [d["mutual_rate"] for d in diag]
    assert all("diagnostics/view_agreement" in row and "diagnostics/all_consistency" in row for row in logged)
    assert (run / "label-free-round2.png").stat().st_size > 0


def share(path, colour) -> float:
    a = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    return float((a == np.asarray(colour)).all(1).mean())


def test_the_anchor_picture_without_labels_frames_mutual_neighbours(tmp_path):
    n = 40
    entropy = torch.arange(n, dtype=torch.float64)
    nbrs = torch.tensor([[i ^ 1] for i in range(n)])           # pairs (0,1), (2,3), ...: all mutual
    anchor = entropy < 8
    pictures = lambda idx: torch.full((len(idx), 8, 8, 3), 128, dtype=torch.uint8)   # noqa: E731
    mutual_grid = plots.anchor_grid(tmp_path / "m.png", entropy, nbrs, anchor, None, pictures, 1)
    assert share(mutual_grid, plots.MUTUAL) > 0.01 and share(mutual_grid, plots.PLAIN) < 0.001   # (text antialiasing)
    assert share(mutual_grid, plots.SAME) == 0 and share(mutual_grid, plots.OTHER) == 0   # no labels, no colours of them
    one_way = plots.anchor_grid(tmp_path / "o.png", entropy, (nbrs + 2) % n, anchor, None, pictures, 1)
    assert share(one_way, plots.MUTUAL) < 0.001 and share(one_way, plots.PLAIN) > 0.01
