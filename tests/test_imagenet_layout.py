"""ImageNet as users keep it: a flat val/ folder labelled by the devkit's ground truth (+ meta.mat),
Kaggle's LOC_val_solution.csv or a plain val.txt; a class subset (data.classes); both loaders
under 2 ranks on such a tree."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import ENV, REPO, events, final_bank, free_port, jpeg

from and_dist.data.sources.index import load_index
from and_dist.data.sources.layout import resolve_layout
from and_dist.platform.errors import UserError

WNIDS = [f"n0{1000000 + 7919 * k:07d}" for k in range(12)]        # 12 sorted synthetic wnids
ILSVRC_ID = {w: 12 - k for k, w in enumerate(WNIDS)}              # devkit ids in another order than sorted
TRAIN_PER_CLASS, VAL = 3, 24


def val_name(k: int) -> str:
    return f"ILSVRC2012_val_{k:08d}.JPEG"


def make_flat_tree(root: Path) -> tuple[Path, list[str]]:
    """train/<wnid>/ with 3 images each, and a flat val/ of 24 files; returns the val wnids by file."""
    rng = np.random.default_rng(0)
    for c, wnid in enumerate(WNIDS):
        d = root / "train" / wnid
        d.mkdir(parents=True)
        for k in range(TRAIN_PER_CLASS):
            (d / f"{wnid}_{k}.JPEG").write_bytes(jpeg(rng, c % 3))
    (root / "val").mkdir()
    truth = [WNIDS[int(c)] for c in rng.permutation(np.arange(VAL) % len(WNIDS))]
    for k, wnid in enumerate(truth, 1):
        (root / "val" / val_name(k)).write_bytes(jpeg(rng, WNIDS.index(wnid) % 3))
    return root, truth


def write_devkit(folder: Path, truth: list[str]) -> Path:
    from scipy.io import savemat
    folder.mkdir(parents=True, exist_ok=True)
    synsets = np.zeros(len(WNIDS) + 1, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    for k, w in enumerate(WNIDS):
        synsets[k] = (ILSVRC_ID[w], w, 0)
    synsets[-1] = (len(WNIDS) + 1, "n00001740", 3)                    # an inner node, as meta.mat has
    savemat(folder / "meta.mat", {"synsets": synsets})
    path = folder / "ILSVRC2012_validation_ground_truth.txt"
    path.write_text("".join(f"{ILSVRC_ID[w]}\n" for w in truth))
    return path


def write_kaggle(path: Path, truth: list[str]) -> Path:
    rows = [f"{val_name(k)[:-5]},{w} 10 20 100 120 {w} 5 5 50 50" for k, w in enumerate(truth, 1)]
    path.write_text("ImageId,PredictionString\n" + "\n".join(rows[::-1]) + "\n")     # any row order
    return path


def write_plain(path: Path, truth: list[str], as_index: bool) -> Path:
    path.write_text("".join(f"{val_name(k)} {WNIDS.index(w) if as_index else w}\n" for k, w in enumerate(truth, 1)))
    return path


class Opts:
    def __init__(self, val_labels="", classes="", val_ids=""):
        self.val_labels, self.classes, self.val_ids = str(val_labels), str(classes), str(val_ids)


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    return make_flat_tree(tmp_path_factory.mktemp("flat") / "imagenet")


@pytest.mark.parametrize("kind", ["devkit", "kaggle", "plain-wnid", "plain-index"])
def test_each_label_format_gives_each_file_its_class(flat, tmp_path, kind):
    root, truth = flat
    path = {"devkit": lambda: write_devkit(tmp_path / "devkit" / "data", truth),
            "kaggle": lambda: write_kaggle(tmp_path / "LOC_val_solution.csv", truth),
            "plain-wnid": lambda: write_plain(tmp_path / "val.txt", truth, False),
            "plain-index": lambda: write_plain(tmp_path / "val.txt", truth, True)}[kind]()
    layout = resolve_layout(str(root), Opts(path))
    assert layout.classes == WNIDS and layout.test == "val"
    index = load_index(str(root), "val", layout.classes, str(tmp_path / "cache"), 2, lambda *_: None, False,
                       listing=layout.listing, extra=layout.key("val"))
    assert len(index) == VAL
    got = {name: layout.classes[label] for name, label in zip(index.names, index.labels)}
    for k in (1, 2, 7, VAL):                                         # spot checks
        assert got[val_name(k)] == truth[k - 1]
    assert got == {val_name(k): w for k, w in enumerate(truth, 1)}
    assert list(index.labels) == sorted(index.labels)                # class order, as class folders
    # The list is cached; a changed label file is noticed and read again.
    lines = []
    again = load_index(str(root), "val", layout.classes, str(tmp_path / "cache"), 2, lines.append, False,
                       listing=layout.listing, extra=layout.key("val"))
    assert not lines and again.names == index.names
    if kind == "plain-wnid":
        swapped = list(truth)
        swapped[0] = WNIDS[(WNIDS.index(truth[0]) + 1) % len(WNIDS)]
        write_plain(path, swapped, False)
        changed = load_index(str(root), "val", layout.classes, str(tmp_path / "cache"), 2, lines.append, False,
                             listing=layout.listing, extra=layout.key("val"))
        assert lines and layout.classes[changed.labels[changed.names.index(val_name(1))]] == swapped[0]


def _bad_cases(tmp: Path, truth: list[str]):
    """(label file, words the one line must hold) per mistake."""
    def plain(name, lines):
        (tmp / name).write_text("".join(f"{a} {b}\n" for a, b in lines))
        return tmp / name
    good = [(val_name(k), w) for k, w in enumerate(truth, 1)]
    yield tmp / "nowhere.txt", ["nowhere.txt", "does not exist"]
    yield plain("unknown.txt", good[:3] + [(val_name(4), "n09999999")] + good[4:]), ["line 4", "n09999999"]
    yield plain("twice.txt", good + [good[2]]), [val_name(3), "twice", "line 3"]
    yield plain("short.txt", good[:-1]), [val_name(VAL), "no label"]
    yield plain("extra.txt", good + [("ILSVRC2012_val_00000099.JPEG", truth[0])]), ["missing from", "00000099"]
    (tmp / "odd.txt").write_text("a b c d\n")
    yield tmp / "odd.txt", ["not a format", "LOC_val_solution.csv"]
    devkit = write_devkit(tmp / "devkit", truth)
    ids = devkit.read_text().splitlines()
    devkit.write_text("\n".join(ids[:1] + ["77"] + ids[2:]) + "\n")
    yield devkit, ["line 2", "'77'", "ILSVRC id"]


def test_each_bad_label_file_is_one_line_naming_it(flat, tmp_path):
    root, truth = flat
    for path, words in _bad_cases(tmp_path, truth):
        with pytest.raises(UserError) as e:
            resolve_layout(str(root), Opts(path)).listing("val")
        message = str(e.value)
        assert "\n" not in message and all(w in message for w in words), (path.name, message)


@pytest.mark.slow
def test_a_flat_val_without_labels_and_an_unknown_subset_wnid_exit_2_with_one_line(flat, tmp_path):
    root, _ = flat
    (tmp_path / "ten.txt").write_text("# a list\n" + "\n".join(WNIDS[:9] + ["n07777777"]) + "\n")
    for extra, words in ((), ["data.val_labels", "LOC_val_solution.csv", "ground_truth"]),\
                         ((f"data.classes={tmp_path / 'ten.txt'}",), ["line 11", "n07777777", "data.classes"]):
        proc = subprocess.run([sys.executable, "-m", "and_dist.train", "--config", "demo", "data.source=imagefolder",
                               f"data.root={root}", "data.loader=torch", f"out_dir={tmp_path}", *extra],
                              cwd=REPO, env=ENV, text=True, capture_output=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and all(w in proc.stderr for w in words), proc.stderr


def test_the_imagenet100_list_is_cmc_s_hundred_wnids(flat):
    lines = [s for s in (REPO / "configs" / "imagenet100.txt").read_text().splitlines() if s and s[0] != "#"]
    assert len(lines) == len(set(lines)) == 100 and lines[0] == "n02869837" and lines[-1] == "n02090622"
    from and_dist.config import load_config
    cfg = load_config("imagenet100_resnet18", [f"data.root={flat[0]}"])
    assert cfg.data.classes == str(REPO / "configs" / "imagenet100.txt") and cfg.data.loader != "cached"


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_a_flat_val_trains_and_evaluates_under_two_ranks(flat, tmp_path, loader):
    """Both loaders, 2 ranks, a flat val/ labelled by LOC_val_solution.csv; the DALI run also on a
    10-class subset: 10 classes, the bank sized to their 30 images."""
    root, truth = flat
    labels = write_kaggle(tmp_path / "LOC_val_solution.csv", truth)
    subset = []
    if loader == "dali":
        (tmp_path / "ten.txt").write_text("\n".join(WNIDS[2:]) + "\n")
        subset = [f"data.classes={tmp_path / 'ten.txt'}"]
    run = tmp_path / "run"
    args = ["--config", "demo", "data.source=imagefolder", f"data.root={root}", f"data.loader={loader}",
            f"data.val_labels={labels}", *subset, "data.image_size=32", "data.workers=1", "model.arch=convnet_small",
            "train.batch_size=8", "train.threads=1", "eval.knn_k=3", "log.progress=false", "curriculum.rounds=1",
            "train.epochs_per_round=1", f"run_dir={run}", f"data.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", "-m", "and_dist.train", *args],
                          cwd=REPO, env=ENV, text=True, capture_output=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    classes, n_val = (10, sum(w in WNIDS[2:] for w in truth)) if subset else (12, VAL)
    n_train = classes * TRAIN_PER_CLASS
    assert f"{n_train} train / {n_val} test images, {classes} classes" in proc.stdout, proc.stdout
    assert final_bank(run).shape[0] == n_train
    assert len(events(run, "round")) == 1
    assert 0 <= json.loads((run / "summary.json").read_text())["final_knn_top1"] <= 100
    assert torch.isfinite(final_bank(run)).all()


def test_a_long_check_logs_its_progress_with_an_eta_when_no_bar_is_shown(flat, tmp_path):
    """Not on a terminal (a SLURM log), the first start's check says how far it is and how long is left."""
    import and_dist.data.sources.index as index_module
    root, _ = flat
    lines, chunk = [], index_module.CHUNK
    index_module.CHUNK = 4                         # tiny tasks, so a 36-file tree reports several times
    try:
        got = index_module.parallel(index_module.check_image, sorted(map(str, (root / "train").rglob("*.JPEG"))),
                                    2, "check train", False, lines.append, every=0)
    finally:
        index_module.CHUNK = chunk
    assert len(got) == 36 and all(c[3] is None for c in got)
    assert lines and all(re.fullmatch(r"check train: \d+/36 files \(\d+%\), \d+/s, ETA [\d.]+ min", s) for s in lines), lines
