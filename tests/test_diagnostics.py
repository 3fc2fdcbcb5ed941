"""AND's diagnostic: neighbourhood class-consistency by entropy decile and of the anchors against
the rest, on constructed neighbourhoods whose answer is known; the picture; the unlabelled case."""
import json

import pytest
import torch
from PIL import Image

from and_dist.platform.log import RunLog
from and_dist.method.curriculum import Curriculum, consistency
from and_dist.method.diagnostics import by_entropy_bins, chance, diagnose, sample_consistency
from and_dist.method.discovery import Neighbourhood
from and_dist.training.report import Report


def test_deciles_follow_the_entropy_ranking_with_uneven_bins_and_ties_by_index():
    n = 25
    entropy = torch.randperm(n, generator=torch.Generator().manual_seed(0)).double()
    rank = torch.empty(n)
    rank[torch.argsort(entropy)] = torch.arange(n, dtype=torch.float)
    # bin b holds ranks [b*25//10, (b+1)*25//10): 0-1, 2-4, 5-6, 7-9, 10-11, 12-14, 15-16, 17-19, 20-21, 22-24
    assert by_entropy_bins(entropy, rank.double()) == [0.5, 3, 5.5, 8, 10.5, 13, 15.5, 18, 20.5, 23]
    # equal entropies rank by index, as anchors are picked: samples 0-9 fill the bins in order
    assert by_entropy_bins(torch.zeros(10), torch.arange(10.0).double()) == [float(i) for i in range(10)]
    assert by_entropy_bins(torch.zeros(3), torch.ones(3).double()) == [None] * 3 + [1.0] + [None] * 2 + \
        [1.0] + [None] * 2 + [1.0]


def test_diagnosis_of_a_constructed_neighbourhood():
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    neighbours = torch.tensor([[1, 2], [0, 3], [3, 4], [4, 5], [5, 0], [-1, 4]])
    per = sample_consistency(neighbours, labels)
    assert per.tolist() == [1.0, 0.5, 0.0, 1.0, 0.5, 1.0]          # a missing neighbour (-1) is not counted
    entropy = torch.tensor([0.1, 0.5, 0.9, 0.2, 0.3, 0.8], dtype=torch.float64)
    anchor = torch.tensor([True, False, False, True, True, False])  # the three lowest entropies
    d = diagnose(entropy, neighbours, anchor, labels, bins=3)
    assert d.deciles == [1.0, 0.5, 0.5]                              # ranks: (0, 3), (4, 1), (5, 2)
    assert d.anchors == pytest.approx(2.5 / 3) and d.rest == pytest.approx(1.5 / 3)
    assert d.all == pytest.approx(4 / 6) and d.chance == pytest.approx(12 / 30) == chance(labels)
    full = torch.tensor([[1, 2], [0, 3], [3, 4], [4, 5], [5, 0], [3, 4]])
    assert diagnose(entropy, full, anchor, labels).anchors == pytest.approx(consistency(anchor, full, labels))
    m = d.metrics()
    assert m["anchors"] == 3 and [m[f"decile{b}_consistency"] for b in (1, 2, 3)] == [1.0, 0.5, 0.5]
    assert diagnose(entropy, neighbours, anchor, torch.zeros(6, dtype=torch.long)) is None


def report_of(tmp_path, labels, capsys):
    log = RunLog(tmp_path, enabled=True)
    cur = Curriculum(rate=0.25)
    n = len(labels)
    g = torch.Generator().manual_seed(1)
    cur.set_round(1, Neighbourhood(torch.rand(n, generator=g).double(), torch.randint(0, n, (n, 3), generator=g)))
    Report(tmp_path, log, enabled=True).diagnostics(1, cur, labels, step=7)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines() if (tmp_path / "metrics.jsonl").exists() else []
    return [json.loads(x) for x in lines], capsys.readouterr().out


def test_the_report_logs_the_metrics_and_draws_the_picture(tmp_path, capsys):
    events, out = report_of(tmp_path, torch.arange(400) % 10, capsys)
    (e,) = events
    assert e["event"] == "diagnostics" and e["round"] == 1 and e["step"] == 7 and e["anchors"] == 100
    assert all(0 <= e[f"decile{b}_consistency"] <= 1 for b in range(1, 11))
    assert "round 1 consistency by entropy decile" in out
    with Image.open(tmp_path / "consistency-round1.png") as im:
        assert im.format == "PNG" and im.size[0] >= 600 and im.size[1] >= 350


def test_without_labels_the_diagnostic_is_skipped_with_one_line(tmp_path, capsys):
    events, out = report_of(tmp_path, torch.zeros(400, dtype=torch.long), capsys)
    assert events == [] and not (tmp_path / "consistency-round1.png").exists()
    assert out.count("\n") == 1 and "no labels" in out and "no consistency diagnostic" in out
