"""and_dist.data: sources, the in-memory and streamed loaders, augmentation (small generated inputs only)."""
import colorsys
import io
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from and_dist.data import cached as data_mod
from and_dist.data.augment import CIFAR_MEAN, CIFAR_STD, TrainAugment, hsv_to_rgb, rgb_to_hsv
from and_dist.data.augment import TestTransform as EvalTransform   # alias: keep pytest from collecting it
from and_dist.data import load_datasets
from and_dist.data.sources.demo import CLASSES, make_demo


# ------------------------------------------------------------------------------------------ demo

def test_demo_deterministic_shapes_and_balance():
    tr, te = make_demo(200, 50, seed=1)
    tr2, te2 = make_demo(200, 50, seed=1)
    assert torch.equal(tr.images, tr2.images) and torch.equal(te.images, te2.images)
    assert torch.equal(tr.labels, tr2.labels) and torch.equal(te.labels, te2.labels)
    assert not torch.equal(make_demo(200, 50, seed=2)[0].images, tr.images)
    assert tr.images.shape == (200, 32, 32, 3) and te.images.shape == (50, 32, 32, 3)
    assert tr.images.dtype == torch.uint8 and tr.images.is_contiguous()
    assert tr.labels.dtype == torch.int64
    assert tr.labels.bincount(minlength=10).tolist() == [20] * 10
    assert te.labels.bincount(minlength=10).tolist() == [5] * 10
    assert tr.classes == CLASSES and len(set(CLASSES)) == 10 and tr.skipped == []
    assert tr.images.float().std() > 30                   # not a blank image set


def test_demo_through_load_datasets_and_size():
    tr, te = load_datasets("demo", "", 24, None, demo_train=30, demo_test=10, demo_seed=0)
    assert tr.images.shape == (30, 24, 24, 3) and te.images.shape == (10, 24, 24, 3)


# ----------------------------------------------------------------------------------- imagefolder

def _save(path, arr, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)


@pytest.fixture
def folder(tmp_path):
    """train/{cat,dog} + test/{cat,dog}; one garbage file and one truncated JPEG in train/cat."""
    rng = np.random.RandomState(0)
    root = tmp_path / "ds"
    imgs = {}
    for rel in ["train/cat/a.png", "train/cat/c.png", "train/dog/b.png", "test/cat/z.png", "test/dog/y.png"]:
        imgs[rel] = rng.randint(0, 256, (8, 8, 3), dtype=np.uint8)
        _save(str(root / rel), imgs[rel])
    _save(str(root / "train/dog/big.jpg"), rng.randint(0, 256, (12, 16, 3), dtype=np.uint8))   # resized
    (root / "train/cat/bad.jpg").write_bytes(b"this is not an image at all" * 10)
    buf = io.BytesIO()
    Image.fromarray(rng.randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    (root / "train/cat/trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "train/cat/notes.txt").write_text("ignored: not an image extension")
    return root, imgs


def test_imagefolder_skips_unreadable_and_keeps_order(folder):
    root, imgs = folder
    messages = []
    tr, te = load_datasets("imagefolder", str(root), 8, None, workers=2, log=messages.append)
    assert tr.classes == ["cat", "dog"] and te.classes == ["cat", "dog"]
    assert tr.labels.tolist() == [0, 0, 1, 1]             # cat/a, cat/c, dog/b, dog/big
    assert te.labels.tolist() == [0, 1]
    assert tr.images.shape == (4, 8, 8, 3) and tr.images.dtype == torch.uint8 and tr.images.is_contiguous()
    assert torch.equal(tr.images[0], torch.from_numpy(imgs["train/cat/a.png"]))
    assert torch.equal(tr.images[1], torch.from_numpy(imgs["train/cat/c.png"]))
    assert torch.equal(tr.images[2], torch.from_numpy(imgs["train/dog/b.png"]))
    assert torch.equal(te.images[1], torch.from_numpy(imgs["test/dog/y.png"]))
    bad, trunc = str(root / "train/cat/bad.jpg"), str(root / "train/cat/trunc.jpg")
    assert [p for p, _ in tr.skipped] == [bad, trunc] and te.skipped == []
    for path in (bad, trunc):
        hits = [m for m in messages if path in m]
        assert len(hits) == 1 and hits[0].startswith("skipping unreadable image ")


def test_imagefolder_cache_hit_identical(folder, tmp_path, monkeypatch):
    root, _ = folder
    cache = tmp_path / "cache"
    tr, te = load_datasets("imagefolder", str(root), 8, str(cache), log=lambda m: None)
    assert len(list(cache.glob("*.pt"))) == 2 and not list(cache.glob("*tmp*"))

    calls = []
    real_decode = data_mod._decode
    monkeypatch.setattr(data_mod, "_decode", lambda *a: calls.append(a[0]) or real_decode(*a))
    messages = []
    tr2, te2 = load_datasets("imagefolder", str(root), 8, str(cache), log=messages.append)
    assert torch.equal(tr.images, tr2.images) and torch.equal(tr.labels, tr2.labels)
    assert torch.equal(te.images, te2.images) and torch.equal(te.labels, te2.labels)
    assert tr2.skipped == tr.skipped and calls == []
    assert len([m for m in messages if m.startswith("skipping")]) == 2 and len(messages) == 3
    assert "1 file(s) left out for their extension" in messages[0]          # notes.txt
    # a changed file must invalidate the cache of its split only
    _save(str(root / "train/dog/b.png"), np.zeros((8, 9, 3), np.uint8))
    tr3, _ = load_datasets("imagefolder", str(root), 8, str(cache), log=lambda m: None)
    assert len(calls) == 6 and tr3.images[2].sum() == 0



def test_sixteen_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    from and_dist.data.sources.folder import to_rgb
    grey = (np.arange(256, dtype=np.uint16).reshape(16, 16)) * 257       # 16-bit, 0..65535
    Image.fromarray(grey).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as img:
        assert img.mode.startswith("I")
        assert np.asarray(img.convert("RGB")).mean() > 250                # what Pillow alone gives
        rgb = np.asarray(to_rgb(img))
    assert rgb.shape == (16, 16, 3) and np.array_equal(rgb[..., 0], grey // 257)
    ramp = Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8))
    assert np.asarray(to_rgb(ramp))[..., 1].max() == 255 and np.asarray(to_rgb(ramp)).min() == 0


def test_imagefolder_walks_sub_folders_and_survives_odd_names_and_dangling_links(tmp_path):
    rng = np.random.RandomState(1)
    root = tmp_path / "odd"
    for rel in ["train/a/1.png", "train/a/deeper/2.png", "train/b/3.JFIF", "test/a/t.png", "test/b/u.png",
                "test/c/v.png"]:
        _save(str(root / rel), rng.randint(0, 256, (8, 8, 3), dtype=np.uint8), "PNG" if "JFIF" not in rel else "JPEG")
    (root / "train" / "c").mkdir()                                       # a class without train images
    os.symlink("/nonexistent/x.png", root / "train" / "a" / "gone.png")
    os.symlink(root / "train" / "a", root / "train" / "a" / "deeper" / "loop")   # a link cycle
    latin1 = os.path.join(os.fsencode(root / "train" / "b"), b"caf\xe9.png")   # not UTF-8
    Image.fromarray(rng.randint(0, 256, (8, 8, 3), dtype=np.uint8)).save(latin1, format="PNG")
    messages = []
    tr, te = load_datasets("imagefolder", str(root), 8, str(tmp_path / "cache"), workers=2, log=messages.append)
    names = sorted(os.path.basename(p) for p, _ in tr.skipped)
    assert names == ["gone.png"] and "No such file" in tr.skipped[0][1]
    assert tr.labels.tolist() == [0, 0, 1, 1] and len(te) == 3          # a/1, a/deeper/2, b/3.JFIF, b/caf?
    assert any("without images: 'c'" in m for m in messages)


def test_links_back_into_the_tree_are_read_once_and_links_out_of_it_are_followed(tmp_path):
    """A class folder's link to train/ (the tree of 31 images that trained on 50), a file link to
    another class's image and a second link to one outside folder: each left out with a line
    naming it. A folder and a file linked from outside the tree are read, once."""
    from and_dist.data.sources.folder import list_split
    from and_dist.prepare import plan_copy
    rng = np.random.RandomState(2)
    root, outside = tmp_path / "tree", tmp_path / "elsewhere"
    for rel in [*(f"train/a/{i}.png" for i in range(12)), *(f"train/b/{i}.png" for i in range(19)),
                "test/a/t.png", "test/b/u.png", "o/x.png", "o/y.png", "solo.png"]:
        where = outside if rel.startswith(("o/", "solo")) else root
        _save(str(where / rel), rng.randint(0, 256, (8, 8, 3), dtype=np.uint8), "PNG")
    os.symlink(root / "train", root / "train" / "a" / "all")            # back into the tree
    os.symlink(root / "train" / "b" / "0.png", root / "train" / "a" / "b0.png")
    os.symlink(outside / "o", root / "train" / "a" / "more")           # out of it: followed
    os.symlink(outside / "o", root / "train" / "b" / "same")           # the same place again
    os.symlink(outside / "solo.png", root / "train" / "b" / "solo.png")
    said = []
    paths, labels = list_split(str(root), "train", ["a", "b"], said.append)
    assert labels.count(0) == 12 + 2 and labels.count(1) == 19 + 1, (labels, said)
    assert len(set(map(os.path.realpath, paths))) == len(paths) == 34
    skipped = sorted(l.split()[2] for l in said if l.startswith("warning: skipping"))
    assert skipped == sorted(str(root / "train" / p) for p in ("a/all", "a/b0.png", "b/same")), said
    assert all("would be read twice" in l for l in said if l.startswith("warning: skipping"))
    tr, _ = load_datasets("imagefolder", str(root), 8, None, log=lambda m: None)
    assert len(tr) == 34 and tr.labels.tolist() == labels
    images, _ = plan_copy(str(root), str(tmp_path / "copy"), log=lambda m: None)     # prepare's walk: the same
    assert len(images) == 34 + 2


# ---------------------------------------------------------------------------- official formats

def _planar(images):
    """(n, 32, 32, 3) -> official CIFAR rows (n, 3072), channel planes R, G, B."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def test_cifar10_reader(tmp_path):
    rng = np.random.RandomState(0)
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    train = rng.randint(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    test = rng.randint(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    for i in range(5):
        _pickle(d / f"data_batch_{i + 1}", {b"data": _planar(train[2 * i:2 * i + 2]), b"labels": [i, 9 - i]})
    _pickle(d / "test_batch", {b"data": _planar(test), b"labels": [3, 1, 4]})
    _pickle(d / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    tr, te = load_datasets("cifar10", str(tmp_path), 32, None)
    assert torch.equal(tr.images, torch.from_numpy(train)) and torch.equal(te.images, torch.from_numpy(test))
    assert tr.labels.tolist() == [0, 9, 1, 8, 2, 7, 3, 6, 4, 5] and te.labels.tolist() == [3, 1, 4]
    assert tr.classes == [f"c{i}" for i in range(10)] and tr.labels.dtype == torch.int64
    small, _ = load_datasets("cifar10", str(tmp_path), 16, None)
    assert small.images.shape == (10, 16, 16, 3) and small.images.dtype == torch.uint8


def test_cifar100_reader(tmp_path):
    rng = np.random.RandomState(1)
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    train = rng.randint(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    test = rng.randint(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    _pickle(d / "train", {b"data": _planar(train), b"fine_labels": [99, 0, 5, 7], b"coarse_labels": [1, 2, 3, 4]})
    _pickle(d / "test", {b"data": _planar(test), b"fine_labels": [42, 43], b"coarse_labels": [0, 0]})
    _pickle(d / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                         b"coarse_label_names": [b"x"] * 20})
    tr, te = load_datasets("cifar100", str(tmp_path), 32, None)
    assert torch.equal(tr.images, torch.from_numpy(train)) and torch.equal(te.images, torch.from_numpy(test))
    assert tr.labels.tolist() == [99, 0, 5, 7] and te.labels.tolist() == [42, 43]
    assert len(tr.classes) == 100 and tr.classes[99] == "f99"


def test_svhn_reader(tmp_path):
    from scipy.io import savemat
    rng = np.random.RandomState(2)
    sets = {}
    for split, n in (("train", 5), ("test", 3)):
        imgs = rng.randint(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        y = np.arange(1, n + 1, dtype=np.uint8).reshape(n, 1) + (10 - n)          # ends with label 10
        savemat(str(tmp_path / f"{split}_32x32.mat"), {"X": imgs.transpose(1, 2, 3, 0), "y": y})
        sets[split] = (imgs, y)
    tr, te = load_datasets("svhn", str(tmp_path), 32, None)
    assert torch.equal(tr.images, torch.from_numpy(sets["train"][0]))
    assert torch.equal(te.images, torch.from_numpy(sets["test"][0]))
    assert tr.labels.tolist() == [6, 7, 8, 9, 0] and te.labels.tolist() == [8, 9, 0]
    assert tr.classes == [str(i) for i in range(10)]


def test_unknown_source():
    with pytest.raises(ValueError):
        load_datasets("mnist", "", 32, None)


# ------------------------------------------------------------------------------------- augment

@pytest.fixture(scope="module")
def batch():
    return make_demo(10, 0, seed=3)[0].images


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_augment_shape_dtype_device(batch):
    out = TrainAugment(24)(batch, _gen(0))
    assert out.shape == (10, 3, 24, 24) and out.dtype == torch.float32 and out.device == batch.device
    assert torch.isfinite(out).all()
    test = EvalTransform(24, CIFAR_MEAN, CIFAR_STD)(batch)
    assert test.shape == (10, 3, 24, 24) and test.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_augment_on_gpu_matches_cpu(batch):
    cpu = TrainAugment(32)(batch, _gen(0))
    gpu = TrainAugment(32)(batch.cuda(), _gen(0))
    assert gpu.device.type == "cuda" and torch.allclose(gpu.cpu(), cpu, atol=1e-3)


def test_augment_deterministic_given_seed(batch):
    aug = TrainAugment(32)
    assert torch.equal(aug(batch, _gen(5)), aug(batch, _gen(5)))
    assert not torch.equal(aug(batch, _gen(5)), aug(batch, _gen(6)))


def test_augment_offset_slices_equal_whole_batch(batch):
    aug = TrainAugment(32)
    whole = aug(batch, _gen(7))
    parts = torch.cat([aug(batch[:4], _gen(7), offset=0, total=10), aug(batch[4:], _gen(7), offset=4, total=10)])
    assert torch.equal(whole, parts)
    with pytest.raises(ValueError):
        aug(batch, _gen(7), offset=4, total=10)


def test_augment_identity_and_flip(batch):
    test = EvalTransform(32)(batch)
    ident = TrainAugment(32, crop_scale=(1, 1), ratio=(1, 1), jitter=0, grayscale_p=0, flip=False)
    assert (ident(batch, _gen(0)) - test).abs().max() < 1e-5
    flip = TrainAugment(32, crop_scale=(1, 1), ratio=(1, 1), jitter=0, grayscale_p=0, flip=True)
    out = flip(batch, _gen(0))
    flipped = [bool((o - t.flip(-1)).abs().max() < 1e-5) for o, t in zip(out, test)]
    same = [bool((o - t).abs().max() < 1e-5) for o, t in zip(out, test)]
    assert all(a or b for a, b in zip(flipped, same)) and any(flipped) and any(same)


def test_augment_grayscale_all(batch):
    out = TrainAugment(32, grayscale_p=1.0)(batch, _gen(1))
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    raw = out * std + mean
    assert (raw[:, 0] - raw[:, 1]).abs().max() < 1e-5 and (raw[:, 0] - raw[:, 2]).abs().max() < 1e-5
    assert raw.min() > -1e-5 and raw.max() < 1 + 1e-5


def test_crop_params_like_torchvision():
    aug = TrainAugment(32, crop_scale=(0.2, 1.0))
    p = aug.draw(2000, 32, 40, _gen(0))
    assert (p["h"] >= 1).all() and (p["w"] >= 1).all() and (p["top"] >= 0).all() and (p["left"] >= 0).all()
    assert (p["top"] + p["h"] <= 32).all() and (p["left"] + p["w"] <= 40).all()
    frac = p["h"] * p["w"] / (32 * 40)
    assert frac.min() > 0.15 and frac.max() <= 1.0
    ratio = p["w"] / p["h"]
    assert ratio.min() > 0.6 and ratio.max() < 1.6
    # no candidate can fit: fallback is the centre crop with the ratio clamped into range
    p = TrainAugment(32, crop_scale=(1, 1), ratio=(2, 2)).draw(3, 32, 32, _gen(0))
    assert p["w"].tolist() == [32] * 3 and p["h"].tolist() == [16] * 3 and p["top"].tolist() == [8] * 3


def test_hsv_roundtrip_matches_colorsys():
    x = torch.rand(2, 3, 4, 5, generator=_gen(0))
    x[0, :, 0, 0] = 0.5                                    # a grey pixel
    hsv = rgb_to_hsv(x)
    for b, i, j in [(0, 0, 0), (0, 1, 2), (1, 3, 4)]:
        ref = colorsys.rgb_to_hsv(*x[b, :, i, j].tolist())
        assert np.allclose(hsv[b, :, i, j].tolist(), ref, atol=1e-6)
    assert (hsv_to_rgb(hsv) - x).abs().max() < 1e-5


def test_jitter_changes_colours_within_range(batch):
    plain = TrainAugment(32, jitter=0, grayscale_p=0)(batch, _gen(2))
    jit = TrainAugment(32, jitter=0.4, grayscale_p=0)(batch, _gen(2))
    assert not torch.allclose(plain, jit)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    raw = jit * std + mean
    assert raw.min() > -1e-5 and raw.max() < 1 + 1e-5


def test_masked_colour_jitter_equals_the_indexed_one():
    """The GPU path (every op on the whole batch, selected by mask) gives the CPU path's images."""
    from and_dist.data.augment import jitter_indexed, jitter_masked
    g = torch.Generator().manual_seed(3)
    x = torch.rand(16, 3, 8, 8, generator=g)
    factors = torch.empty(16, 4).uniform_(0.6, 1.4, generator=g)
    factors[:, 3] = torch.empty(16).uniform_(-0.4, 0.4, generator=g)
    order = torch.rand(16, 4, generator=g).argsort(1)
    f = factors.view(16, 4, 1, 1, 1)
    assert torch.allclose(jitter_masked(x.clone(), f, order), jitter_indexed(x.clone(), f, order), atol=1e-6)


# -------------------------------------------------------------------------------------- prefetch

def _cached(prefetch: int, n: int = 96, batch: int = 16):
    from and_dist.config import Config
    from and_dist.platform.dist import Env
    from and_dist.data.cached import CachedData
    cfg = Config()
    cfg.data.prefetch, cfg.train.batch_size = prefetch, batch
    tr, te = make_demo(n, 16, seed=3)
    return CachedData(tr, te, cfg, Env())


def test_prefetched_batches_equal_the_ones_built_in_the_step():
    serial = list(_cached(0).batches(1, 2, start=1))
    ahead = list(_cached(3).batches(1, 2, start=1))
    assert len(serial) == len(ahead) == 96 // 16 - 1
    for a, b in zip(serial, ahead):
        assert torch.equal(a.images, b.images) and torch.equal(a.index, b.index)
        assert a.sizes == b.sizes and torch.equal(a.labels, b.labels)


def test_prefetch_stops_its_worker_when_the_consumer_leaves_early():
    import threading
    from and_dist.data.prefetch import prefetch
    made = []

    def batches():
        for i in range(1000):
            made.append(i)
            yield i

    it = prefetch(batches(), 2, torch.device("cpu"))
    assert [next(it), next(it)] == [0, 1]
    it.close()                                       # what a stop signal's early return does
    assert not any(t.name == "batch-prefetch" for t in threading.enumerate())
    assert len(made) <= 5                            # at most `depth` built past what was taken


def test_prefetch_reraises_the_workers_error_in_the_step():
    from and_dist.data.prefetch import prefetch

    def batches():
        yield 0
        raise OSError("disk gone")

    it = prefetch(batches(), 2, torch.device("cpu"))
    assert next(it) == 0
    with pytest.raises(OSError, match="disk gone"):
        next(it)


def _jitter_inputs(n: int = 16, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g)
    factors = torch.empty(n, 4).uniform_(0.6, 1.4, generator=g)
    factors[:, 3] = torch.empty(n).uniform_(-0.4, 0.4, generator=g)
    return x, factors.view(n, 4, 1, 1, 1), torch.rand(n, 4, generator=g).argsort(1)


@pytest.mark.slow
def test_compiled_jitter_is_one_graph_equal_to_eager_from_a_worker_thread():
    """What CUDA runs (the masked jitter through torch.compile) captured whole, with the eager
    result, when called where the prefetcher calls it: on another thread."""
    import threading
    from and_dist.data.augment import Compiled, jitter_masked
    x, f, order = _jitter_inputs()
    fused = Compiled(jitter_masked)
    fused.compiled = torch.compile(jitter_masked, dynamic=False, fullgraph=True)   # a graph break fails
    got = {}
    worker = threading.Thread(target=lambda: got.update(out=fused(x.clone(), f, order)))
    worker.start()
    worker.join()
    assert not fused.failed
    assert torch.allclose(got["out"], jitter_masked(x.clone(), f, order), atol=1e-5)


def test_a_jitter_that_cannot_compile_runs_eagerly_and_says_so_once(monkeypatch):
    from and_dist.data.augment import Compiled, jitter_masked

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    x, f, order = _jitter_inputs()
    fused = Compiled(jitter_masked)
    with pytest.warns(UserWarning, match="no compiler here"):
        out = fused(x.clone(), f, order)
    assert fused.failed and torch.equal(out, jitter_masked(x.clone(), f, order))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # not said twice
        fused(x.clone(), f, order)
