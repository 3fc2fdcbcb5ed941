"""Packs speak WebDataset: the real `webdataset` and `wids` packages read our shards (each image
followed by its `.cls` label; `<split>.wids.json`), shards written by `webdataset.TarWriter`
become a pack (indexed and linked, not re-encoded) that feeds training exactly as the same images
from a tree, and a version-1 pack (no .cls members) still reads."""
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset
import wids

from helpers import ENV, REPO, events, final_bank, jpeg

from and_dist import prepare
from and_dist.config import load_config
from and_dist.data import build_data
from and_dist.data.sources.pack import PACK_MANIFEST, open_pack, sha256_of, wds_key
from and_dist.data.sources.pack_wds import find_shards
from and_dist.data.sources.pack_write import finish, write_index, write_pack
from and_dist.platform import dist
from and_dist.platform.errors import UserError

CLASSES = ("n01", "n02", "n03")


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """3 classes: 6 training images each (one a PNG), 2 test images each, in class folders."""
    root, rng = tmp_path_factory.mktemp("tree"), np.random.default_rng(1)
    for split, n in (("train", 6), ("test", 2)):
        for c, wnid in enumerate(CLASSES):
            (root / split / wnid).mkdir(parents=True)
            for k in range(n):
                png = split == "train" and c == 1 and k == 2
                name = f"{wnid}_{k:03d}." + ("png" if png else "JPEG")
                (root / split / wnid / name).write_bytes(jpeg(rng, c, "RGB", "PNG" if png else "JPEG"))
    return root


@pytest.fixture(scope="module")
def pack(tree, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("out") / "pack"
    write_pack(str(tree), str(dst), workers=1, shard_bytes=8 << 10, log=quiet, progress=False)
    return dst


def test_webdataset_and_wids_read_our_pack_with_its_labels(pack):
    splits = dict(zip(("train", "test"), open_pack(str(pack), None, 1, log=quiet)))
    assert len(list(pack.glob("train-*.tar"))) > 2                       # several shards
    for split, ours in splits.items():
        urls = sorted(str(p) for p in pack.glob(f"{split}-*.tar"))
        streamed = list(webdataset.WebDataset(urls, shardshuffle=False, empty_check=False))
        indexed = wids.ShardListDataset(str(pack / f"{split}.wids.json"), localname=lambda url: url,
                                        transformations=[])
        assert len(streamed) == len(indexed) == len(ours) > 0
        for i in range(len(ours)):
            ext = ours.names[i].rsplit(".", 1)[1]
            assert streamed[i]["__key__"] == wds_key(ours.names[i])
            assert int(streamed[i]["cls"]) == int(indexed[i][".cls"].read()) == ours.labels[i]
            assert streamed[i][ext.lower()] == indexed[i]["." + ext].read() == ours.read(i)


def test_dali_reads_our_pack_through_its_index_files(pack):
    from nvidia.dali import fn, pipeline_def
    train, _ = open_pack(str(pack), None, 1, log=quiet)
    shards = sorted(str(p) for p in pack.glob("train-*.tar"))

    @pipeline_def(batch_size=len(train), num_threads=1, device_id=None)
    def read():
        indexes = [s.removesuffix(".tar") + ".idx" for s in shards]
        return tuple(fn.readers.webdataset(paths=shards, index_paths=indexes, ext=["JPEG;png", "cls"],
                                           missing_component_behavior="error"))
    pipe = read()
    pipe.build()
    images, labels = pipe.run()
    assert [int(bytes(np.array(labels.at(i)))) for i in range(len(train))] == list(train.labels)
    assert all(bytes(np.array(images.at(i))) == train.read(i) for i in range(len(train)))


def webdataset_copy(tree: Path, src: Path) -> None:
    """The tree as WebDataset shards written by webdataset.TarWriter (imagenet-train-NNNNNN.tar,
    imagenet-val-NNNNNN.tar), plus samples a pack leaves out: no label, a corrupt image."""
    src.mkdir()
    for split, word, shards in (("train", "train", 2), ("test", "val", 1)):
        paths = sorted(p for p in (tree / split).rglob("*") if p.is_file())
        for k, part in enumerate(np.array_split(np.arange(len(paths)), shards)):
            with webdataset.TarWriter(str(src / f"imagenet-{word}-{k:06d}.tar")) as sink:
                for i in part:
                    p = paths[i]
                    ext = "png" if p.suffix == ".png" else "jpg"
                    sink.write({"__key__": p.stem, ext: p.read_bytes(), "cls": CLASSES.index(p.parent.name)})
                    if split == "train" and i == 3:
                        sink.write({"__key__": "unlabelled", "jpg": p.read_bytes()})
                        sink.write({"__key__": "corrupt", "jpg": b"\xff\xd8\xff\xe0" + bytes(300), "cls": 0})


def test_webdataset_shards_become_a_pack_that_feeds_training_as_the_tree_does(tree, tmp_path):
    src, dst = tmp_path / "wds", tmp_path / "pack"
    webdataset_copy(tree, src)
    assert prepare.main([str(src), str(dst), "--pack", "--workers=1"]) == 0
    manifest = json.loads((dst / PACK_MANIFEST).read_text())
    left = {where.rsplit(":", 1)[1]: why for where, why in manifest["splits"]["train"]["skipped"]}
    assert left.keys() == {"unlabelled", "corrupt.jpg"} and left["unlabelled"] == "no integer .cls label"
    assert left["corrupt.jpg"].startswith("UnidentifiedImageError")
    for shard in manifest["splits"]["train"]["shards"]:          # linked, not re-encoded or copied
        assert os.path.samefile(dst / shard["file"], shard["source"])
    got = {}
    for source, root in (("imagefolder", tree), ("pack", dst)):
        cfg = load_config("demo", [f"data.source={source}", f"data.root={root}", "data.loader=cached",
                                   "data.image_size=32", "data.workers=1", "train.batch_size=8"])
        data = build_data(cfg, dist.Env(), str(tmp_path / f"cache-{source}"), quiet, False)
        got[source] = (data.train.labels, data.test.labels, *(b.images for b in data.batches(1, 0)),
                       torch.cat(list(data.eval_images("test", 0, 6))))
    assert len(got["pack"]) == len(got["imagefolder"]) > 4
    for a, b in zip(got["imagefolder"], got["pack"]):
        assert torch.equal(a, b)
    # wids reads the indexed shards too: its sample count includes the two left out
    index = json.loads((dst / "train.wids.json").read_text())
    assert sum(s["nsamples"] for s in index["shardlist"]) == len(got["pack"][0]) + 2


def test_shards_whose_names_say_no_split_or_tree_options_are_refused(tree, tmp_path):
    webdataset_copy(tree, tmp_path / "wds")
    assert prepare.main([str(tmp_path / "wds"), str(tmp_path / "p1"), "--pack", "--shorter-side=64"]) == 2
    shutil.copy(tmp_path / "wds" / "imagenet-val-000000.tar", tmp_path / "wds" / "shard-000.tar")
    with pytest.raises(UserError, match="shard-000.tar: its name does not say one split"):
        find_shards(str(tmp_path / "wds"))
    assert find_shards(str(tree)) is None                            # a tree is packed as before


def test_a_version_1_pack_without_cls_members_still_reads(tree, tmp_path):
    """Version 1, as it was written before the .cls members: images only."""
    dst = tmp_path / "v1"
    dst.mkdir()
    manifest = {"format": "and_dist pack", "version": 1, "classes": list(CLASSES), "made_with": {}, "splits": {}}
    for split in ("train", "test"):
        paths = sorted(p for p in (tree / split).rglob("*") if p.is_file())
        names = [str(p.relative_to(tree)) for p in paths]
        with tarfile.open(dst / f"{split}-00000.tar", "w", format=tarfile.PAX_FORMAT) as tar:
            for p, name in zip(paths, names):
                tar.add(p, name)
        with tarfile.open(dst / f"{split}-00000.tar") as tar:
            rows = [(i, m.offset_data, m.size, 1, 1, "JPEG") for i, m in enumerate(tar.getmembers())]
        write_index(str(dst), split, [{"rows": rows}], [CLASSES.index(p.parent.name) for p in paths], names)
        shard = {"file": f"{split}-00000.tar", "bytes": (dst / f"{split}-00000.tar").stat().st_size,
                 "samples": len(rows), "sha256": sha256_of(str(dst / f"{split}-00000.tar"))}
        manifest["splits"][split] = {"folder": split, "samples": len(rows), "shards": [shard], "skipped": []}
    finish(str(dst), manifest)
    train, test = open_pack(str(dst), None, 1, log=quiet)
    assert len(train) == 18 and train.read(0) == (tree / train.names[0]).read_bytes()
    assert list(test.labels) == [0, 0, 1, 1, 2, 2]


@pytest.mark.slow
def test_training_from_a_webdataset_pack_is_the_run_from_the_tree(tree, tmp_path):
    src, dst = tmp_path / "wds", tmp_path / "pack"
    webdataset_copy(tree, src)
    assert prepare.main([str(src), str(dst), "--pack", "--workers=1"]) == 0
    runs = {}
    for source, root in (("imagefolder", tree), ("pack", dst)):
        runs[source] = run = tmp_path / source
        proc = subprocess.run([sys.executable, "-m", "and_dist.train", "--config", "demo", f"data.source={source}",
                               f"data.root={root}", "data.image_size=32", "model.arch=convnet_small",
                               "curriculum.rounds=2", "train.epochs_per_round=1", "train.batch_size=8",
                               "train.threads=1", "eval.knn_k=5", "log.progress=false", f"run_dir={run}",
                               f"data.cache_dir={tmp_path / 'cache'}"],
                              cwd=REPO, env=ENV, text=True, capture_output=True, timeout=180)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    losses = {s: [e["loss"] for e in events(r, "epoch")] for s, r in runs.items()}
    assert len(losses["pack"]) == 2 and losses["pack"] == losses["imagefolder"]
    assert torch.equal(final_bank(runs["pack"]), final_bank(runs["imagefolder"]))
