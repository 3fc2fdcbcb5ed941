"""Packed datasets (`prepare --pack`, `data.source=pack`): the pack holds the tree's images in tar
shards standard tools read; every loader reads it as it reads the tree, so training from the pack
is the tree's run; prepare resumes after a kill; a damaged shard or a mismatched index is refused
at start with one line."""
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import ENV, REPO, events, final_bank, jpeg

from and_dist.config import ConfigError, load_config
from and_dist.data import build_data
from and_dist.data.sources.pack import open_pack
from and_dist.platform import dist
from and_dist.platform.errors import UserError

pytestmark = pytest.mark.slow          # every test here starts processes (or uses a fixture that does)

CLASSES = ("n01", "n02", "n03")
PER_CLASS = 12
BAD = ("corrupt.JPEG", "truncated.JPEG")


def make_tree(root: Path) -> Path:
    """3 classes of small JPEGs (one a PNG, one a GIF: transcoded), an unreadable pair, and a flat
    val/ labelled by a CSV at the root."""
    rng = np.random.default_rng(0)
    for c, wnid in enumerate(CLASSES):
        d = root / "train" / wnid
        d.mkdir(parents=True)
        for k in range(PER_CLASS):
            (d / f"{wnid}_{k:03d}.JPEG").write_bytes(jpeg(rng, c))
    odd = root / "train" / CLASSES[1]
    (odd / "png.JPEG").write_bytes(jpeg(rng, 1, "RGB", "PNG"))
    (odd / "anim.gif").write_bytes(jpeg(rng, 1, "P", "GIF"))
    (odd / "corrupt.JPEG").write_bytes(b"\xff\xd8\xff\xe0" + rng.bytes(400))
    (odd / "truncated.JPEG").write_bytes(jpeg(rng, 1)[:600])
    (root / "val").mkdir()
    rows = []
    for k in range(9):
        (root / "val" / f"v{k:03d}.JPEG").write_bytes(jpeg(rng, k % 3))
        rows.append(f"v{k:03d},{CLASSES[k % 3]} 1 2 3 4\n")
    (root / "labels.csv").write_text("ImageId,PredictionString\n" + "".join(rows))
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("tree"))


def _prepare(tree: Path, dst: Path, *extra: str, **kw) -> subprocess.Popen:
    labels = [] if any(e.startswith("--val-labels") for e in extra) else [f"--val-labels={tree / 'labels.csv'}"]
    cmd = [sys.executable, "-m", "and_dist.prepare", str(tree), str(dst), "--pack", "--workers=1", *labels, *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def _made(tree: Path, dst: Path, *extra: str) -> Path:
    proc = _prepare(tree, dst, *extra)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    return dst


@pytest.fixture(scope="module")
def pack(tree, tmp_path_factory) -> Path:
    return _made(tree, tmp_path_factory.mktemp("out") / "pack", "--shard-size=16K")


def _files(root: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


# ----------------------------------------------------------------------------------- writing

def test_the_pack_is_tar_shards_with_checksums_that_standard_tools_read(tree, pack):
    shards = sorted(pack.glob("train-*.tar"))
    assert len(shards) > 2 and sorted(pack.glob("test-*.tar"))          # 16K shards: several
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=pack, capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.count(": OK") == len(list(pack.glob("*.tar")))
    members = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()
                            if not m.name.endswith(".cls")})       # the labels: test_pack_webdataset.py
    readable = sorted(p for p in (tree / "train").rglob("*") if p.is_file() and p.name not in BAD)
    assert sorted(members) == sorted(str(p.relative_to(tree)) for p in readable)
    for p in readable:
        data = members[str(p.relative_to(tree))]
        if p.suffix == ".gif":            # transcoded to PNG for DALI: the same pixels
            with Image.open(p) as a, Image.open(io.BytesIO(data)) as b:
                assert b.format == "PNG" and np.array_equal(np.array(a.convert("RGB")), np.array(b))
        else:
            assert data == p.read_bytes(), p               # JPEG and PNG byte for byte

    train, test = open_pack(str(pack), None, 1, log=lambda *_: None)
    assert len(train) == 3 * PER_CLASS + 2 and [Path(p).name for p, _ in train.skipped] == list(BAD)
    assert train.classes == list(CLASSES) and len(test) == 9
    assert [CLASSES[x] for x in test.labels] == [CLASSES[int(n[5:8]) % 3] for n in test.names]   # the CSV's
    assert all(CLASSES[train.labels[i]] == train.names[i].split("/")[1] for i in range(len(train)))


def test_prepare_pack_killed_midway_resumes_to_the_pack_of_a_run_left_alone(tmp_path, big_jpeg_tree):
    """Large noisy JPEGs resized to 64 px (slow: the kill lands midway), 16K shards."""
    big = big_jpeg_tree                     # conftest: test_prepare.make_tree, made once
    opts = ("--shard-size=16K", "--shorter-side=64")
    labels = f"--val-labels={big / 'LOC_val_solution.csv'}"
    dst = tmp_path / "pack"
    proc = _prepare(big, dst, *opts, labels, start_new_session=True)
    deadline = time.time() + 60                              # two shards finished: kill it there
    while len(list((dst / ".work").glob("train-*.json"))) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "prepare ended before it could be killed"
    assert not (dst / "pack.json").exists()
    out = subprocess.run([sys.executable, "-m", "and_dist.train", "--config", "demo", "data.source=pack",
                          f"data.root={dst}", f"out_dir={tmp_path}"], cwd=REPO, env=ENV, text=True,
                         capture_output=True, timeout=120)
    assert out.returncode == 2 and "left unfinished" in out.stderr, out.stderr
    resumed = _prepare(big, dst, *opts, labels)
    text, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, text
    kept = int(text.rsplit(": ", 1)[1].split(" kept")[0])
    assert kept > 0, text                                       # the finished shards were not redone
    alone = _made(big, tmp_path / "alone", *opts, labels)
    got, want = _files(dst), _files(alone)
    assert got.keys() == want.keys()
    for name in want:
        if name != "pack.json":                       # pack.json names its source folder only
            assert got[name] == want[name], name
    again = _prepare(big, dst, "--shard-size=16K", labels)                  # other options: refused
    text, _ = again.communicate(timeout=60)
    assert again.returncode == 2 and "made with" in text


# ----------------------------------------------------------------------------------- reading

def _config(source: str, root: Path, loader: str, *extra: str):
    labels = [f"data.val_labels={root / 'labels.csv'}"] if source == "imagefolder" else []
    return load_config("demo", [f"data.source={source}", f"data.root={root}", f"data.loader={loader}",
                                "data.image_size=32", "data.workers=1", "train.batch_size=8", *labels, *extra])


@pytest.mark.parametrize("loader", ["cached", "torch", "dali"])
def test_each_loader_reads_the_pack_as_it_reads_the_tree(tree, pack, tmp_path, loader):
    got = {}
    for source, root in (("imagefolder", tree), ("pack", pack)):
        data = build_data(_config(source, root, loader), dist.Env(), str(tmp_path / source), lambda *_: None, False)
        batch = next(data.batches(1, 2))
        got[source] = (batch.images, batch.index, data.train.labels, data.test.labels,
                       torch.cat(list(data.eval_images("test", 0, 9))), torch.cat(list(data.eval_images("train", 3, 20))))
    for a, b in zip(got["imagefolder"], got["pack"]):
        assert torch.equal(a, b)


def test_training_from_the_pack_is_the_run_from_the_tree(tree, pack, tmp_path):
    """The demo-size check: 2 rounds, same kNN per round, same final bank."""
    runs = {}
    for source, root in (("imagefolder", tree), ("pack", pack)):
        labels = [f"data.val_labels={root / 'labels.csv'}"] if source == "imagefolder" else []
        run = tmp_path / source
        proc = subprocess.run([sys.executable, "-m", "and_dist.train", "--config", "demo", f"data.source={source}",
                               f"data.root={root}", "data.image_size=32", "model.arch=convnet_small", *labels,
                               "curriculum.rounds=2", "train.epochs_per_round=1", "train.batch_size=8",
                               "train.threads=1", "eval.knn_k=5", "log.progress=false", f"run_dir={run}",
                               f"data.cache_dir={tmp_path / 'cache'}"],
                              cwd=REPO, env=ENV, text=True, capture_output=True, timeout=180)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        runs[source] = run
    knn = {s: [e["knn_top1"] for e in events(r, "round")] for s, r in runs.items()}
    assert len(knn["pack"]) == 2 and knn["pack"] == knn["imagefolder"]
    assert torch.equal(final_bank(runs["pack"]), final_bank(runs["imagefolder"]))


# ----------------------------------------------------------------------------------- bad input

def _copy(pack: Path, tmp: Path) -> Path:
    dst = tmp / "copy"
    shutil.copytree(pack, dst)
    return dst


def test_a_truncated_or_altered_shard_is_refused_at_start_naming_it(pack, tmp_path):
    bad = _copy(pack, tmp_path)
    shard = bad / "train-00001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[:-1024])
    proc = subprocess.run([sys.executable, "-m", "and_dist.train", "--config", "demo", "data.source=pack",
                           f"data.root={bad}", f"out_dir={tmp_path / 'out'}"], cwd=REPO, env=ENV, text=True,
                          capture_output=True, timeout=120)
    assert proc.returncode == 2 and str(shard) in proc.stderr and "truncated" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    altered = bytearray(data)
    altered[700] ^= 0xFF                                          # same size, one bit pattern changed
    shard.write_bytes(bytes(altered))
    with pytest.raises(UserError, match=r"train-00001\.tar: sha256 .* differs"):
        open_pack(str(bad), str(tmp_path / "cache"), 1, log=lambda *_: None)
    shard.write_bytes(data)                                      # whole again: checked once, remembered
    lines = []
    open_pack(str(bad), str(tmp_path / "cache"), 1, log=lines.append)
    assert any("checking the sha256" in line for line in lines)
    lines.clear()
    open_pack(str(bad), str(tmp_path / "cache"), 1, log=lines.append)
    assert not any("checking the sha256" in line for line in lines)


def test_an_index_that_does_not_match_its_shards_is_refused(pack, tmp_path):
    bad = _copy(pack, tmp_path)
    with np.load(bad / "train-index.npz") as z:
        arrays = dict(z)
    arrays["offset"] = arrays["offset"].copy()
    arrays["offset"][5] += 512                                   # one sample pointed at the wrong place
    with open(bad / "train-index.npz", "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(UserError, match="does not match its shards"):
        open_pack(str(bad), None, 1, log=lambda *_: None)
    arrays["offset"] = arrays["offset"][:-1]                      # one row short
    with open(bad / "train-index.npz", "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(UserError, match="does not match"):
        open_pack(str(bad), None, 1, log=lambda *_: None)


def test_options_a_pack_cannot_serve_are_config_errors(tree, pack, tmp_path):
    with pytest.raises(ConfigError, match="fixed when it is made"):
        load_config("demo", ["data.source=pack", f"data.root={pack}", "data.classes=imagenet100.txt"])
    with pytest.raises(ConfigError, match="holds a pack.*data.source=pack"):
        load_config("demo", ["data.source=imagefolder", f"data.root={pack}"])
    with pytest.raises(ConfigError, match="has no pack.json"):
        load_config("demo", ["data.source=pack", f"data.root={tree}"])
    cfg = load_config("demo", ["data.source=pack", f"data.root={pack}", "data.loader=torch", "data.image_size=128"])
    assert cfg.data.source == "pack"                              # streamed: any size
