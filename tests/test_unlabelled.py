"""AND on a folder of the user's own images (data.source=images): every image under the root,
sub-folders included and not classes, in a fixed order; junk left out and listed; no labels, so
no kNN or probes (one line each) while everything label-free runs. Real files, real runs."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import ENV, REPO, events, free_port, jpeg, train_here

from and_dist.config import ConfigError, load_config
from and_dist.data import build_data
from and_dist.data.sources.images import list_images
from and_dist.platform import dist
from and_dist.platform.errors import UserError

RUN = ["data.source=images", "train.batch_size=12", "train.epochs_per_round=2", "curriculum.rounds=3",
       "curriculum.anchor_rate=0.3", "train.threads=1", "log.progress=false", "checkpoint.every_epochs=0",
       "model.arch=convnet_gn", "discovery.kernel=exact"]


def make_folder(root, n=36, seed=0):
    """n JPEGs spread over nested folders (a sub-folder is not a class), plus a text file, an
    unreadable .jpg and a hidden file; returns the readable images' paths, sorted."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        folder = os.path.join(root, f"trip{i % 3}", *(["day2"] if i % 2 else []))
        os.makedirs(folder, exist_ok=True)
        paths.append(os.path.join(folder, f"img{i:03d}.jpg"))
        with open(paths[-1], "wb") as f:
            f.write(jpeg(rng, i % 3))
    with open(os.path.join(root, "notes.txt"), "w") as f:
        f.write("not an image")
    with open(os.path.join(root, "trip1", "broken.jpg"), "wb") as f:
        f.write(b"not a jpeg either")
    with open(os.path.join(root, ".hidden.jpg"), "wb") as f:
        f.write(b"")
    return sorted(paths)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    return str(root), make_folder(str(root))


def train_in_process(run_dir, root, *extra):
    return train_here("demo", RUN + [f"data.root={root}", f"run_dir={run_dir}", *extra])


def test_every_image_under_the_root_in_sorted_order(folder):
    root, paths = folder
    said = []
    found, labels = list_images(root, said.append)
    broken = os.path.join(root, "trip1", "broken.jpg")            # unreadable: left out when it is decoded
    assert found == sorted(paths + [broken]) and labels == [0] * len(found)   # nested too; no .txt, no hidden
    assert any("1 file(s) left out for their extension" in s for s in said), said


@pytest.fixture(scope="module")
def cached_run(folder, tmp_path_factory):
    root, _ = folder
    return train_in_process(tmp_path_factory.mktemp("runs") / "cached", root)


def test_a_folder_trains_discovers_and_finishes_without_labels(folder, cached_run, capsys):
    root, paths = folder
    run, trainer, summary = cached_run
    assert summary is not None and summary["final_knn_top1"] is None
    assert len(trainer.data.train) == len(paths) and len(trainer.data.test) == 0
    assert (run / "skipped.txt").read_text().startswith(os.path.join(root, "trip1", "broken.jpg"))
    assert events(run, "knn") == []
    assert [e["round"] for e in events(run, "discovery")] == [1, 2]
    assert all(e["consistency"] is None for e in events(run, "round"))
    assert json.loads((run / "summary.json").read_text())["rounds"][-1]["anchors"] == round(0.3 * 2 * len(paths))


def test_the_streaming_loader_reads_the_same_files_in_the_same_order(folder, tmp_path):
    root, paths = folder
    cfg = load_config("demo", RUN + [f"data.root={root}", "data.loader=torch", "data.workers=0",
                                     "data.image_size=32", f"out_dir={tmp_path}"])
    said = []
    data = build_data(cfg, dist.init("cpu"), str(tmp_path / "cache"), said.append, False)
    index = data.index["train"]
    assert [index.path(i) for i in range(len(index))] == paths and len(data.test) == 0
    assert data.train.skipped[0][0] == os.path.join(root, "trip1", "broken.jpg")
    batch = next(iter(data.batches(0, 0)))
    assert batch.images.shape == (12, 3, 32, 32)
    import torch
    idx, g = torch.arange(5, 35), lambda: torch.Generator().manual_seed(3)   # noqa: E731
    whole = data.views(idx, g(), 0, 30)                       # more rows than a step's: decoded in pieces
    parts = torch.cat([data.views(idx, g(), 0, 10), data.views(idx, g(), 10, 20)])   # as two ranks would
    assert whole.shape == (30, 3, 32, 32) and torch.allclose(whole, parts)


def test_an_empty_or_missing_folder_is_one_line(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("x")
    cfg = load_config("demo", RUN + [f"data.root={tmp_path / 'empty'}", f"out_dir={tmp_path}"])
    with pytest.raises(UserError, match="holds no images .*1 other file"):
        build_data(cfg, dist.init("cpu"), None, print, False)
    with pytest.raises(ConfigError, match="not an existing folder; data.source=images"):
        load_config("demo", RUN + [f"data.root={tmp_path / 'nope'}"])


@pytest.mark.slow
def test_the_command_line_says_an_empty_folder_in_one_line_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    p = subprocess.run([sys.executable, "-m", "and_dist.train", "--config", "demo", *RUN,
                        f"data.root={tmp_path / 'empty'}", f"out_dir={tmp_path}"],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0, p.stderr
    assert "holds no images" in p.stderr


def test_evaluate_and_probe_refuse_a_folder_without_labels(cached_run, capsys):
    from and_dist import evaluate, probe
    run = cached_run[0]
    for main, args in ((evaluate.main, ["knn", "--checkpoint", str(run)]), (probe.main, ["--checkpoint", str(run)])):
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "has no labels" in err and "\n" not in err, err


def test_each_discovery_hands_back_its_neighbourhoods_with_the_files(folder, cached_run):
    from and_dist.method.label_free import mutual
    root, paths = folder
    run, trainer, _ = cached_run
    assert sorted(p.name for p in (run / "neighbourhoods").iterdir()) == ["round1.npz", "round2.npz"]
    z = np.load(run / "neighbourhoods" / "round2.npz")
    assert list(z["files"]) == paths and int(z["round"]) == 2                 # row i is the file of bank row i
    nb = trainer.curriculum.nbhd
    assert np.array_equal(z["neighbours"], nb.neighbours.numpy()) and np.array_equal(z["entropy"], nb.entropy.numpy())
    assert np.array_equal(z["anchor"], trainer.curriculum.anchor.numpy())
    assert np.array_equal(z["mutual_rate"], mutual(nb.neighbours).numpy())
    assert np.isfinite(z["view_agreement"]).sum() == len(paths)              # sample = every row here
    assert np.isnan(np.load(run / "neighbourhoods" / "round1.npz")["round_stability"]).all()


def test_export_writes_every_embedding_with_its_file(folder, cached_run, tmp_path, capsys):
    import torch
    from helpers import final_bank
    from and_dist.eval.features import extract
    from and_dist.export import main
    root, paths = folder
    run, trainer, _ = cached_run
    assert main([str(run), "--to", "embeddings", str(tmp_path / "bank.npz")]) == 0
    z = np.load(tmp_path / "bank.npz")
    assert list(z["files"]) == paths and np.array_equal(z["embeddings"], final_bank(run).float().numpy())
    assert main([str(run), "--to", "embeddings", "--features", "recompute", str(tmp_path / "fresh.npz")]) == 0
    fresh = np.load(tmp_path / "fresh.npz")["embeddings"]
    want = torch.nn.functional.normalize(extract(trainer.model, trainer.data.eval_images("train", 0, len(paths))), dim=1)
    assert np.allclose(fresh, want.numpy(), atol=1e-5)
    capsys.readouterr()
    assert main([str(run), "--to", "embeddings", str(tmp_path / "x.csv")]) == 2
    assert capsys.readouterr().err.strip().endswith("embeddings are written as a .npz file")


def test_each_discovery_logs_how_stale_the_bank_rows_were(cached_run):
    from and_dist.data.sampler import global_batches
    run, trainer, _ = cached_run
    n, per_epoch = trainer.bank.n, trainer.data.steps(1, 0)
    last_epoch = global_batches(n, 12, 1, 0, 1, 1)            # round 1's last epoch, before discovery 2
    want = np.full(n, -1)
    for step, idx in enumerate(last_epoch):
        want[idx.numpy()] = per_epoch - 1 - step               # steps since that row's last update
    z = np.load(run / "neighbourhoods" / "round2.npz")
    assert np.array_equal(z["bank_age"], want)
    (d,) = [e for e in events(run, "diagnostics") if e["round"] == 2]
    assert d["bank_age_median_steps"] == np.median(want) and d["bank_never_updated"] == 0
    assert d["bank_age_p90_epochs"] == pytest.approx(np.quantile(want, 0.9) / per_epoch)


def test_row_ages_survive_a_checkpoint(tmp_path):
    import torch
    from and_dist.method.bank import ShardedBank
    bank = ShardedBank(10, 4)
    for step in range(3):
        bank.update(torch.tensor([step, step + 1]), torch.randn(2, 4))
    assert bank.ages().tolist() == [2, 1, 0, 0] + [-1] * 6
    again = ShardedBank(10, 4, seed=1)
    again.load_state_dict([bank.state_dict()])
    assert torch.equal(again.ages(), bank.ages())
    old = {k: v for k, v in bank.state_dict().items() if k not in ("updated", "updates")}   # before issue 34
    ShardedBank(10, 4).load_state_dict([old])


@pytest.mark.slow
def test_two_ranks_discover_and_measure_as_one(folder, tmp_path):
    """torchrun, 2 gloo ranks, float64: the same neighbourhoods, label-free measures (the view
    search runs sharded) and bank ages as one process; the run exports."""
    root, paths = folder
    args = [*RUN, f"data.root={root}", "train.dtype=float64", f"out_dir={tmp_path}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "and_dist.train", "--config", "demo", *args, f"run_dir={tmp_path / 'two'}"]
    p = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    one = train_in_process(tmp_path / "one", root, "train.dtype=float64", f"out_dir={tmp_path}")[0]
    keys = ("mutual_rate", "view_agreement", "round_stability", "bank_age_median_steps", "decile3_view_agreement")
    diag = {run: [{k: e[k] for k in keys} for e in events(run, "diagnostics")] for run in (one, tmp_path / "two")}
    assert diag[one] == diag[tmp_path / "two"] and len(diag[one]) == 2
    for name in ("round1.npz", "round2.npz"):
        a, b = (np.load(run / "neighbourhoods" / name) for run in (one, tmp_path / "two"))
        assert all(np.array_equal(a[k], b[k]) for k in ("neighbours", "anchor", "files", "bank_age"))
    out = tmp_path / "emb.npz"
    e = subprocess.run([sys.executable, "-m", "and_dist.export", str(tmp_path / "two"), "--to", "embeddings", str(out)],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert e.returncode == 0 and list(np.load(out)["files"]) == paths, e.stderr


def test_a_folder_packs_and_trains_from_its_pack(folder, tmp_path):
    from and_dist.prepare import main as prepare
    from and_dist.data.sources.images import labelled
    root, paths = folder
    assert prepare([root, str(tmp_path / "pack"), "--pack", "--images", "--workers", "1"]) == 0
    for loader in ("cached", "torch"):
        cfg = load_config("demo", RUN + ["data.source=pack", f"data.root={tmp_path / 'pack'}", f"data.loader={loader}",
                                         "data.workers=0", f"out_dir={tmp_path}"])
        data = build_data(cfg, dist.init("cpu"), str(tmp_path / "cache"), print, False)
        assert not labelled(data) and len(data.train) == len(paths)
        names = [data.train.path(i).split(".tar:")[1] for i in range(len(paths))]
        assert names == [os.path.relpath(p, root) for p in paths]
        assert data.train.skipped[0][0].endswith("broken.jpg")
        assert next(iter(data.batches(0, 0))).images.shape[0] == 12
