"""The run's pictures: valid PNGs of a readable size, anchor-grid borders that tell the truth about
labels, and tools/plot_runs.py on real and in-progress run directories."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from and_dist.platform import plots

REPO = Path(__file__).parent.parent
ENV = {"PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": "/tmp"}
BLUE, ORANGE = (31, 119, 180), (255, 127, 14)      # matplotlib's first two colours


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def share_of(image: np.ndarray, colour, tol: int = 12) -> float:
    return float((np.abs(image.astype(int) - colour).max(-1) <= tol).mean())


def rows(n: int) -> list[dict]:
    return [{"round": r, "anchors": 30 * r, "consistency": None if r == 0 else 0.5 + 0.05 * r,
             "knn_top1": 20.0 + 3 * r, "knn_top5": 60.0 + 2 * r} for r in range(n)]


def flat_pictures(size: int = 32):
    """Sample i is a flat grey picture of value 40 + 5 i, so a tile says which sample it shows."""
    asked = []

    def pictures(index: torch.Tensor) -> torch.Tensor:
        asked.append(index.clone())
        value = ((40 + 5 * index) % 256).to(torch.uint8)
        return value[:, None, None, None].expand(len(index), size, size, 3).contiguous()
    return pictures, asked


def test_anchor_grid_frames_same_label_neighbours_green_and_the_others_red(tmp_path):
    n, k = 12, 2
    entropy = torch.linspace(3.0, 4.0, n, dtype=torch.float64)
    anchor = torch.zeros(n, dtype=torch.bool)
    for i, e in ((7, 0.3), (2, 0.1), (9, 0.2)):        # the three lowest entropies, out of index order
        entropy[i], anchor[i] = e, True
    neighbours = torch.tensor([[(i + 1) % n, (i + 5) % n] for i in range(n)])
    labels = torch.arange(n) % 4
    labels[3] = labels[2]          # anchor 2: first neighbour same label, second not
    labels[8] = 99                 # anchor 7: first neighbour different ...
    labels[0] = labels[7]          # ... second the same (index 12 % 12 = 0)
    labels[10] = labels[9]         # anchor 9: first same; second (index 2) different
    pictures, _ = flat_pictures()
    path = plots.anchor_grid(tmp_path / "anchors.png", entropy, neighbours, anchor, labels, pictures, 3)
    image = pixels(path)
    width, height, _ = plots.grid_size(3, k + 1)
    assert image.shape == (height, width, 3)
    expected = {2: [True, False], 9: [True, False], 7: [False, True]}
    for row, a in enumerate([2, 9, 7]):                 # lowest entropy on top
        for col, sample in enumerate([a, *neighbours[a].tolist()]):
            top, left = plots.tile_box(row, col, 3, k + 1)
            border = tuple(image[top + 1, left + plots.FRAME // 2])
            inside = image[top + plots.FRAME // 2, left + plots.FRAME // 2]
            assert (inside == 40 + 5 * sample).all(), (row, col, inside)
            if col == 0:
                assert border == plots.ANCHOR
            else:
                assert border == (plots.SAME if expected[a][col - 1] else plots.OTHER), (row, col, border)


def test_anchor_grid_spreads_rows_from_the_lowest_entropy_to_the_cut_off(tmp_path):
    n = 200
    entropy = torch.rand(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    anchor = entropy <= entropy.kthvalue(100).values
    neighbours = torch.randint(0, n, (n, 12), generator=torch.Generator().manual_seed(2))
    pictures, asked = flat_pictures(48)
    path = plots.anchor_grid(tmp_path / "a.png", entropy, neighbours, anchor, torch.zeros(n, dtype=torch.long),
                             pictures, 1, rows=5)
    shown = asked[0].view(5, -1)[:, 0]                  # one row per anchor: anchor then neighbours
    assert entropy[shown[0]] == entropy[anchor].min()
    assert entropy[shown[-1]] == entropy[anchor].max()
    assert (entropy[shown].diff() > 0).all() and anchor[shown].all()
    cols = plots.MAX_NEIGHBOURS + 1                     # k = 12 is cut to the first MAX_NEIGHBOURS
    assert asked[0].numel() == 5 * cols
    width, height, _ = plots.grid_size(5, cols)
    assert pixels(path).shape == (height, width, 3)
    assert share_of(pixels(path), plots.SAME, 0) > 0.05 and share_of(pixels(path), plots.OTHER, 0) == 0


def test_no_anchors_means_no_anchor_grid(tmp_path):
    n = 10
    path = plots.anchor_grid(tmp_path / "a.png", torch.rand(n), torch.zeros(n, 1, dtype=torch.long),
                             torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.long),
                             flat_pictures()[0], 0)
    assert path is None and not any(tmp_path.iterdir())


@pytest.mark.parametrize("anchors", [0, 40])
def test_entropy_histogram_colours_the_anchors_apart(tmp_path, anchors):
    entropy = torch.randn(300, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 5
    anchor = torch.zeros(300, dtype=torch.bool)
    anchor[torch.sort(entropy).indices[:anchors]] = True
    image = pixels(plots.entropy_histogram(tmp_path / "e.png", entropy, anchor, 2))
    assert 350 <= image.shape[0] <= 600 and 600 <= image.shape[1] <= 900
    assert (share_of(image, ORANGE) > 0.002) == (anchors > 0)
    assert share_of(image, BLUE) > 0.02


@pytest.mark.parametrize("n", [1, 5])
def test_rounds_chart_draws_knn_and_consistency(tmp_path, n):
    image = pixels(plots.rounds_chart(tmp_path / "rounds.png", rows(n)))
    assert image.shape[:2] == (400, 1000)
    assert share_of(image, BLUE) > 0.0002
    assert (share_of(image, (44, 160, 44)) > 0.0005) == (n > 1)     # round 0 has no consistency


@pytest.mark.parametrize("knn", [None, 31.5])
def test_probe_chart_has_a_knn_bar_only_when_given(tmp_path, knn):
    layers = {f"conv{i}": 8.0 * i for i in range(1, 6)}
    image = pixels(plots.probe_chart(tmp_path / "probe.png", layers, knn, "probe"))
    assert image.shape[0] == 400 and image.shape[1] >= 500
    assert (share_of(image, ORANGE, 0) > 0.01) == (knn is not None)
    assert share_of(image, BLUE, 0) > 0.05


def test_pictures_replace_old_files_and_leave_no_temporary_files(tmp_path):
    path = tmp_path / "rounds.png"
    path.write_bytes(b"old")
    plots.rounds_chart(path, rows(3))
    plots.probe_chart(tmp_path / "probe.png", {"conv1": 1.0}, None, "p")
    assert sorted(os.listdir(tmp_path)) == ["probe.png", "rounds.png"]
    assert pixels(path).size > 0


# ---- tools/plot_runs.py ---------------------------------------------------------------------

def plot_runs(*args, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "plot_runs.py"), *map(str, args)], cwd=cwd,
                          text=True, capture_output=True, timeout=120, env=ENV)


@pytest.fixture(scope="module")
def real_run(finished_demo_run) -> Path:
    """A finished 3-round demo run of the trainer (conftest's, made once)."""
    return finished_demo_run[0]


def in_progress_run(root: Path) -> Path:
    """A baseline run still going: metrics.jsonl only, its last line half written."""
    run = root / "demo_instance" / "20260101-000000"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("name: demo_instance\ncurriculum:\n  method: instance\n")
    lines = [json.dumps({"event": "step", "step": 1, "loss": 9.0})]
    lines += [json.dumps({"event": "round", "step": 10 * r["round"], **r}) for r in rows(3)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"event": "rou')
    return run


@pytest.mark.slow
def test_plot_runs_draws_two_runs_in_one_chart(real_run, tmp_path):
    other = in_progress_run(tmp_path)
    done = plot_runs(real_run, other, "--out", tmp_path / "cmp.png")
    assert done.returncode == 0, done.stderr
    summary = json.loads((real_run / "summary.json").read_text())
    first = done.stdout.splitlines()[0]
    assert first.startswith(f"{real_run.parent.name}/{real_run.name}:")
    assert f"r1={summary['rounds'][1]['knn_top1']:.2f}" in first
    assert f"demo_instance/{other.name} [instance]: kNN top-1 r0=20.00 r1=23.00 r2=26.00" in done.stdout
    # consistency beside it: the anchors' per round, all samples' from the diagnostic lines
    diag = [json.loads(l) for l in (real_run / "metrics.jsonl").read_text().splitlines() if '"diagnostics"' in l][0]
    assert diag["round"] == 1
    assert f"r1={summary['rounds'][1]['consistency']:.3f}/{diag['all_consistency']:.3f}" in first
    assert "consistency anchors/all r0=-/- r1=0.550/- r2=0.600/-" in done.stdout
    image = pixels(tmp_path / "cmp.png")
    assert image.shape[1] == 1300                       # two panels: kNN, consistency
    assert share_of(image, BLUE, 0) > 0.001 and share_of(image, ORANGE, 0) > 0.001


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["missing", "empty_dir", "not_json"])
def test_plot_runs_fails_clearly_on_a_path_that_is_not_a_run(real_run, tmp_path, bad):
    path = tmp_path / bad
    if bad == "empty_dir":
        path.mkdir()
    if bad == "not_json":
        path.mkdir()
        (path / "summary.json").write_text("{ not json")
    out = tmp_path / "cmp.png"
    done = plot_runs(real_run, path, "--out", out)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("plot_runs: ") and str(path) in lines[0]
    assert "Traceback" not in done.stderr and not out.exists()
