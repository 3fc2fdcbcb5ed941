"""Streaming loaders (data.loader=dali and torch) on a generated ImageNet-layout tree of real
JPEGs of varied sizes, with ImageNet's kinds of odd files: a corrupt, a truncated and an empty file
(left out, each reported once), a CMYK JPEG, a grayscale JPEG and a PNG named .JPEG (decoded).

Run as a script under torchrun, this file is the per-rank worker of the 2-rank coverage test."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import ENV, REPO, events, final_bank, free_port, jpeg
import torch
from PIL import Image

sys.path.insert(0, str(REPO))

from and_dist.platform import dist  # noqa: E402
from and_dist.config import load_config  # noqa: E402
from and_dist.data import build_data  # noqa: E402
from and_dist.data.sources.index import load_index  # noqa: E402

CLASSES = ("n01440764", "n02102040", "n03000134")
TRAIN_PER_CLASS, VAL_PER_CLASS = 14, 4
BAD = {"corrupt.JPEG": "Error", "truncated.JPEG": "truncated", "empty.JPEG": "cannot identify image file"}
ODD = ("cmyk.JPEG", "gray.JPEG", "png.JPEG")


def make_tree(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c, wnid in enumerate(CLASSES):
            d = root / split / wnid
            d.mkdir(parents=True)
            for k in range(count):
                (d / f"{wnid}_{k:04d}.JPEG").write_bytes(jpeg(rng, c))
    odd = root / "train" / CLASSES[1]
    (odd / "cmyk.JPEG").write_bytes(jpeg(rng, 1, "CMYK"))
    (odd / "gray.JPEG").write_bytes(jpeg(rng, 1, "L"))
    (odd / "png.JPEG").write_bytes(jpeg(rng, 1, "RGB", "PNG"))
    (odd / "corrupt.JPEG").write_bytes(b"\xff\xd8\xff\xe0" + rng.bytes(500))
    (odd / "truncated.JPEG").write_bytes(jpeg(rng, 1)[:700])
    (odd / "empty.JPEG").write_bytes(b"")
    return root


def overrides(root: Path, loader: str, *extra: str) -> list[str]:
    return ["--config", "demo", "data.source=imagefolder", f"data.root={root}", f"data.loader={loader}",
            "data.image_size=64", "data.workers=1", "model.arch=convnet_small", "train.batch_size=10",
            "train.threads=1", "eval.knn_k=5", "log.progress=false", "log.every_steps=1", *extra]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("imagenet"))


# ------------------------------------------------------------------------------ the file index

def test_index_leaves_out_unreadable_files_once_and_decodes_the_odd_ones(tree, tmp_path):
    lines = []
    classes = list(CLASSES)
    index = load_index(str(tree), "train", classes, str(tmp_path), workers=2, log=lines.append, progress=False)
    assert len(index) == 3 * TRAIN_PER_CLASS + len(ODD)
    assert sorted(Path(p).name for p, _ in index.skipped) == sorted(BAD)
    for path, reason in index.skipped:
        assert BAD[Path(path).name] in reason
    assert lines[0].startswith("listing and checking the images of")     # a long step says so
    skips = [line for line in lines if "skipping unreadable image" in line]
    assert len(skips) == len(BAD) == len(lines) - 1
    names = [Path(n).name for n in index.names]
    assert set(ODD) <= set(names) and not set(BAD) & set(names)
    assert index.format_of(names.index("png.JPEG")) == "PNG"
    for i, name in enumerate(index.names):   # label = the class folder; size = the stored size
        assert CLASSES[index.labels[i]] == name.split("/")[0]
        with Image.open(index.path(i)) as img:
            assert tuple(index.sizes[i]) == (img.height, img.width)

    # A second start reads the cache and says nothing; a damaged cache is rebuilt with a line.
    lines.clear()
    again = load_index(str(tree), "train", classes, str(tmp_path), 2, lines.append, False)
    assert again.names == index.names and not lines and again.skipped == index.skipped
    (cache,) = tmp_path.glob("index-train-*.pt")
    cache.write_bytes(b"garbage")
    again = load_index(str(tree), "train", classes, str(tmp_path), 2, lines.append, False)
    assert again.names == index.names and any("unreadable" in line and "again" in line for line in lines)

    # A new file changes its class folder's mtime: the list is built again and holds it.
    extra = tree / "train" / CLASSES[2] / "zz_new.JPEG"
    extra.write_bytes(jpeg(np.random.default_rng(1), 2))
    try:
        grown = load_index(str(tree), "train", classes, str(tmp_path), 2, lines.append, False)
        assert len(grown) == len(index) + 1 and grown.names[-1].endswith("zz_new.JPEG")
        assert len(list(tmp_path.glob("index-train-*.pt"))) == 2
    finally:
        extra.unlink()



def test_a_file_rewritten_in_place_is_noticed_though_its_folder_is_unchanged(tree, tmp_path):
    classes, lines = list(CLASSES), []
    first = load_index(str(tree), "train", classes, str(tmp_path), 2, lines.append, False)
    victim = Path(first.path(0))
    folder, before, old = victim.parent, victim.read_bytes(), victim.stat()
    folder_times = (folder.stat().st_atime_ns, folder.stat().st_mtime_ns)
    try:
        victim.write_bytes(before[: len(before) // 2])                 # truncated in place
        os.utime(folder, ns=folder_times)                              # the cheap key cannot see it
        lines.clear()
        again = load_index(str(tree), "train", classes, str(tmp_path), 2, lines.append, False)
        assert any("1 files changed since" in line for line in lines), lines
        assert str(victim) in [p for p, _ in again.skipped] and len(again) == len(first) - 1
    finally:
        victim.write_bytes(before)
        os.utime(victim, ns=(old.st_atime_ns, old.st_mtime_ns))
        os.utime(folder, ns=folder_times)


# ------------------------------------------------------------------------- the loaders, in process

def _config(root: Path, loader: str, *extra: str):
    return load_config("demo", overrides(root, loader, *extra)[2:])


def _denormalised(x: torch.Tensor) -> torch.Tensor:
    from and_dist.data.stream import IMAGENET_MEAN, IMAGENET_STD
    return x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_a_loader_decodes_the_planned_files_and_resumes_mid_epoch(tree, tmp_path, loader):
    from and_dist.data.pil_stream import load_crop
    data = build_data(_config(tree, loader), dist.Env(), str(tmp_path), lambda *_: None, False)
    index = data.index["train"]
    assert len(data.train) == len(index) == 3 * TRAIN_PER_CLASS + len(ODD) and len(data.test) == 3 * VAL_PER_CLASS
    assert sorted(Path(p).name for p, _ in data.train.skipped) == sorted(BAD)

    # Each planned crop is the file of its sample: the loader's pixels match PIL's crop of that file.
    plans = list(data.plans(0, 0))
    seen = []
    for plan, images in data._decode_train(iter(plans)):
        assert images.dtype == torch.uint8 and images.shape == (len(plan.mine), 64, 64, 3)
        for i, box, got in zip(plan.mine.tolist(), plan.boxes.tolist(), images):
            want = torch.from_numpy(load_crop(index.path(i), box, 64))
            assert (got.float() - want.float()).abs().mean() < 3, (index.names[i], box)
            seen.append(i)
    assert sorted(seen) == list(range(len(index)))      # the odd files (CMYK, gray, PNG) included

    # Test-transformed images of every train sample: the dominant colour is its class's.
    images = _denormalised(torch.cat(list(data.eval_images("train", 0, len(index)))))
    assert images.shape == (len(index), 3, 64, 64)
    colour = images.mean((2, 3)).argmax(1)
    coloured = [i for i, n in enumerate(index.names) if not n.endswith("gray.JPEG")]
    assert torch.equal(colour[coloured], data.train.labels[coloured])
    assert data.pictures(torch.tensor([0, 5])).shape == (2, 64, 64, 3)

    # A pass left unfinished (a stopped run) leaves nothing behind for the next one; resuming at
    # step 2 gives the epoch's steps 2.. exactly; another epoch another order.
    unfinished = data.batches(0, 1)
    first = next(unfinished)
    unfinished.close()
    next(data.eval_images("test", 0, 12)).sum()           # an evaluation pass left unfinished too
    full = list(data.batches(0, 1))
    assert torch.equal(first.images, full[0].images)
    rest = list(data.batches(0, 1, start=2))
    assert len(rest) == len(full) - 2 == data.steps(0, 1) - 2
    for a, b in zip(full[2:], rest):
        assert torch.equal(a.index, b.index) and torch.equal(a.images, b.images)
    assert not torch.equal(full[0].index, next(data.batches(0, 0)).index)
    assert all(torch.equal(b.labels, data.train.labels[b.index]) for b in full)


def test_the_two_loaders_give_the_same_images(tree, tmp_path):
    out = {}
    for loader in ("dali", "torch"):
        data = build_data(_config(tree, loader), dist.Env(), str(tmp_path), lambda *_: None, False)
        out[loader] = (next(data.batches(2, 3)).images, torch.cat(list(data.eval_images("test", 0, 12))))
    for a, b in zip(out["dali"], out["torch"]):
        assert (a - b).abs().mean() < 0.02          # resampling only (0.02 ~ 1/255 after normalisation)


@pytest.mark.slow
def test_a_streaming_loader_of_an_in_memory_source_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "and_dist.train", "--config", "demo", "data.loader=torch",
                           f"out_dir={tmp_path}"], cwd=REPO, env=ENV, text=True, capture_output=True, timeout=120)
    assert proc.returncode == 2 and "streams an ImageFolder tree" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- the trainer on top

def _train(tree: Path, tmp: Path, loader: str, name: str, *extra: str) -> subprocess.Popen:
    args = overrides(tree, loader, f"run_dir={tmp / name}", f"name={name}", f"data.cache_dir={tmp / 'cache'}",
                     "train.batch_size=6", *extra)
    return subprocess.Popen([sys.executable, "-m", "and_dist.train", *args], cwd=REPO, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_a_stopped_dali_run_resumes_to_the_state_of_one_left_alone(tree, tmp_path):
    """Pretraining with DALI end to end (2 rounds of 2 epochs); a copy is stopped by SIGTERM
    mid-epoch and resumed: same losses, same final memory bank."""
    extra = ("curriculum.rounds=2", "train.epochs_per_round=2", "eval.every_epochs=0", "checkpoint.every_epochs=0")
    alone = _train(tree, tmp_path, "dali", "alone", *extra)
    out, _ = alone.communicate(timeout=180)
    assert alone.returncode == 0, out
    run = tmp_path / "stopped"
    proc = _train(tree, tmp_path, "dali", "stopped", *extra)
    deadline = time.time() + 120
    while len(events(run, "step")) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert re.fullmatch(r"r\d+-e\d+-s[1-9]\d*", latest), latest                       # mid-epoch
    resumed = _train(tree, tmp_path, "dali", "stopped", *extra, "resume=auto")
    out, _ = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, out
    ref, got = [e["loss"] for e in events(tmp_path / "alone", "step")], [e["loss"] for e in events(run, "step")]
    assert len(got) == len(ref) == 2 * 2 * -(-(3 * TRAIN_PER_CLASS + len(ODD)) // 6)
    assert max(abs(a - b) for a, b in zip(ref, got)) < 1e-6
    assert torch.allclose(final_bank(run), final_bank(tmp_path / "alone"), atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("loader,ranks", [("dali", 2), ("torch", 1)])
def test_the_imagenet_config_pretrains_then_probes_every_conv_layer(tree, tmp_path, loader, ranks):
    """`imagenet_alexnet.yaml` at a tiny budget: pretraining, kNN, then the five conv probes right
    after (probe.after_train), with probes.json, the per-layer PNG and the offline wandb run."""
    run = tmp_path / "inet"
    head = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
            f"--master_port={free_port()}"] if ranks > 1 else [sys.executable]
    args = ["--config", "imagenet_alexnet", f"data.root={tree}", f"data.loader={loader}", "data.image_size=64",
            "data.workers=1", "train.batch_size=12", "train.epochs_per_round=1", "curriculum.rounds=1",
            "eval.knn_k=5", "probe.epochs=1", "probe.batch_size=12", "log.wandb_mode=offline",
            "train.threads=1", "log.every_steps=1", f"run_dir={run}", f"data.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run([*head, "-m", "and_dist.train", *args], cwd=REPO, env=ENV, text=True,
                          capture_output=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    probes = json.loads((run / "probes.json").read_text())
    assert "conv5" in json.dumps(probes) and "conv1" in json.dumps(probes)
    assert (run / "probes.png").stat().st_size > 1000 and list((run / "wandb").glob("offline-run-*"))
    assert len(events(run, "probe")) >= 1 and "probes done" in proc.stdout
    if loader == "torch":       # the pretraining's own checks (once a separate one-epoch run)
        n = 3 * TRAIN_PER_CLASS + len(ODD)
        assert f"{n} train / {3 * VAL_PER_CLASS} test images, 3 classes, {len(BAD)} skipped" in proc.stdout
        listed = (run / "skipped.txt").read_text().splitlines()
        assert sorted(Path(line.split("\t")[0]).name for line in listed) == sorted(BAD)
        assert len(events(run, "step")) == -(-n // 12) and len(events(run, "round")) == 1
        assert 0 <= json.loads((run / "summary.json").read_text())["final_knn_top1"] <= 100


# ------------------------------------------------------------------------------- 2 ranks, torchrun


def _worker(root: str, out: str, cache: str) -> None:
    """One rank: both loaders' batches of two epochs, saved for the test to check."""
    env = dist.init("cpu")
    torch.set_num_threads(1)
    record = {}
    for loader in ("dali", "torch"):
        data = build_data(_config(Path(root), loader), env, cache, print, False)
        record[loader] = [[{"index": b.index, "sizes": b.sizes, "labels": b.labels, "images": b.images}
                           for b in data.batches(0, epoch)] for epoch in (0, 1)]
    torch.save(record, Path(out) / f"rank{env.rank}.pt")
    dist.shutdown()


@pytest.mark.slow
def test_two_ranks_cover_every_index_once_per_epoch_with_both_loaders(tree, tmp_path):
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           __file__, str(tree), str(tmp_path), str(cache)]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, text=True, capture_output=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("skipping unreadable image") == len(BAD)    # rank 0 reports, once
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for loader in ("dali", "torch"):
        single = build_data(_config(tree, loader), dist.Env(), str(cache), lambda *_: None, False)
        n = len(single.train)
        for epoch in (0, 1):
            steps = [r[loader][epoch] for r in ranks]
            assert len(steps[0]) == len(steps[1]) == single.steps(0, epoch)
            seen = []
            for s0, s1, ref in zip(*steps, single.batches(0, epoch)):
                assert torch.equal(s0["index"], s1["index"]) and torch.equal(s0["index"], ref.index)
                b0 = s0["sizes"][0]
                rows = (s0["index"][:b0], s1["index"][b0:])
                assert len(rows[1]) == s1["sizes"][1] and min(s0["sizes"]) >= 1
                for r, s in zip(rows, (s0, s1)):
                    assert torch.equal(s["labels"], single.train.labels[r])       # index -> class
                seen += torch.cat(rows).tolist()
                # The augmented global batch does not depend on the number of ranks.
                assert torch.allclose(torch.cat([s0["images"], s1["images"]]), ref.images, atol=1e-5)
            assert sorted(seen) == list(range(n)), f"{loader} epoch {epoch}: not every sample exactly once"


if __name__ == "__main__":
    _worker(*sys.argv[1:])
