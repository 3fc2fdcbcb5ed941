"""Linear probes (`python -m and_dist.probe`): the taps and their pooled sizes, an end-to-end probe
of a small AlexNet-BN run (probes.json, chart, metrics, offline wandb), 2 ranks against 1, and a
SIGTERM mid-probe resumed to the uninterrupted result."""
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import events, free_port, wandb_history
import torch
from PIL import Image

from and_dist.eval.probes import Taps
from and_dist.models import build_model

REPO = Path(__file__).parent.parent
ENV = {"PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": "/tmp"}
CONVS = ["conv1", "conv2", "conv3", "conv4", "conv5"]
PROBE = ["probe.epochs=3", "probe.batch_size=20", "train.threads=1", "log.progress=false",
         "log.wandb_mode=offline"]


# ---------------------------------------------------------------------------------- taps

def test_alexnet_taps_at_224_pool_to_the_protocol_sizes_and_read_after_relu_before_pool():
    torch.manual_seed(0)
    model = build_model("alexnet_bn", 128, 224).eval()
    taps = Taps(model, CONVS, 224)
    assert taps.dims == {"conv1": 9600, "conv2": 9216, "conv3": 9600, "conv4": 9600, "conv5": 9216}
    assert [t.shape for t in taps.taps] == [(96, 55, 55), (256, 27, 27), (384, 13, 13), (384, 13, 13),
                                           (256, 13, 13)]
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = model.backbone.conv_features(x)
    for tap, got in zip(taps.taps, taps(x)):
        assert torch.allclose(got, torch.flatten(tap.pool(want[tap.name]), 1), atol=1e-5)
    assert (want["conv1"] >= 0).all()                 # after the ReLU
    taps.close()


def test_the_forward_stops_after_the_deepest_tap():
    model = build_model("alexnet_bn", 128, 224).eval()
    calls = []
    for name in ("conv3", "fc6"):
        getattr(model.backbone, name).register_forward_hook(lambda m, i, o, n=name: calls.append(n))
    taps = Taps(model, ["conv2", "conv1"], 224)
    feats = taps(torch.randn(1, 3, 224, 224))
    assert [f.shape[1] for f in feats] == [9216, 9600] and calls == []


def test_resnet_stages_pool_adaptively_to_about_9k():
    taps = Taps(build_model("resnet18", 128, 224).eval(), ["layer1", "layer2", "layer3", "layer4"], 224)
    assert taps.dims == {"layer1": 64 * 12 * 12, "layer2": 128 * 8 * 8, "layer3": 256 * 6 * 6,
                         "layer4": 512 * 4 * 4}


# ----------------------------------------------------------------------- end to end

def probe(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "and_dist.probe", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout, env=ENV)


def copy_run(pretrained: Path, tmp_path: Path, name: str) -> Path:
    run = tmp_path / name
    shutil.copytree(pretrained, run, ignore=shutil.ignore_patterns(".lock"))
    return run


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A one-epoch AND run of AlexNet-BN on 64-px demo images."""
    run = tmp_path_factory.mktemp("probe") / "pretrained"
    proc = subprocess.run([sys.executable, "-m", "and_dist.train", "--config", "demo", f"run_dir={run}",
                           "data.demo_train=300", "data.demo_test=100", "data.image_size=64",
                           "model.arch=alexnet_bn", "curriculum.rounds=1", "train.epochs_per_round=1",
                           "train.batch_size=60", "eval.knn_k=10", "train.threads=1", "log.progress=false",
                           "log.wandb_mode=offline"],
                          cwd=REPO, text=True, capture_output=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return run


@pytest.fixture(scope="module")
def reference(pretrained, tmp_path_factory) -> Path:
    """The uninterrupted probe of every conv layer, one rank."""
    run = copy_run(pretrained, tmp_path_factory.mktemp("ref"), "run")
    proc = probe("--checkpoint", str(run / "checkpoints" / "latest"), *PROBE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return run


@pytest.mark.slow
def test_probe_writes_json_chart_metrics_and_wandb(reference):
    run = reference
    out = json.loads((run / "probes.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert out["finished"] and out["epochs_done"] == 3 and out["classes"] == 10
    assert list(out["layers"]) == CONVS and out["crop"] == "centre"
    assert all(0 <= r["top1"] <= r["top5"] <= 100 for r in out["layers"].values())
    # 64 px: adaptive pools to s x s, s = min(side, round(sqrt(9216 / channels)))
    assert [r["dim"] for r in out["layers"].values()] == [96 * 10 * 10, 256 * 6 * 6, 384 * 3 * 3, 384 * 3 * 3,
                                                          256 * 3 * 3]
    assert out["knn_top1"] == summary["final_knn_top1"]
    assert [h["epoch"] for h in out["history"]] == [0, 1, 2]
    with Image.open(run / "probes.png") as im:
        assert im.format == "PNG" and im.size[0] >= 400
    probes = events(run, "probe")
    assert [e["epoch"] for e in probes] == [0, 1, 2]
    assert probes[-1]["conv3_top1"] == out["layers"]["conv3"]["top1"]
    rows = [r for r in wandb_history(run) if "probe/conv1_top1" in r]
    assert len(rows) == 3
    assert {n: rows[-1][f"probe/{n}_top1"] for n in CONVS} == {n: r["top1"] for n, r in out["layers"].items()}
    assert all(r["probe/chart/_type"] == "image-file" for r in rows)
    final = [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["event"] == "final"]
    assert rows[0]["_step"] > final[0]["step"] > 0                  # after the pretraining's steps


@pytest.mark.slow
def test_sigterm_mid_probe_saves_and_the_rerun_finishes_with_the_same_result(pretrained, reference, tmp_path):
    run = copy_run(pretrained, tmp_path, "run")
    cmd = [sys.executable, "-m", "and_dist.probe", "--checkpoint", str(run), *PROBE]
    proc = subprocess.Popen(cmd, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    latest, deadline = run / "probes" / "checkpoints" / "latest", time.time() + 120
    while not latest.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out + err
    assert "Traceback" not in out + err
    where = re.search(r"stopped by signal 15 at epoch (\d+) step (\d+)", out + err)
    assert where and latest.read_text().strip() == "e{}-s{}".format(*where.groups()), out + err   # the stop's own save
    assert not json.loads((run / "probes.json").read_text())["finished"]
    again = probe("--checkpoint", str(run), *PROBE)
    assert again.returncode == 0 and "resuming" in again.stdout, again.stdout + again.stderr
    got, want = (json.loads((r / "probes.json").read_text()) for r in (run, reference))
    assert len(got["history"]) == len(want["history"]) == 3
    for g, w in zip(got["history"], want["history"]):
        for n in CONVS:
            for key in ("top1", "top5", "loss"):
                assert g["layers"][n][key] == pytest.approx(w["layers"][n][key], rel=1e-6, abs=1e-6)
    assert [e["epoch"] for e in events(run, "probe")] == [0, 1, 2]
    other = probe("--checkpoint", str(run), *PROBE, "probe.layers=[conv1]")     # not what was saved
    assert other.returncode == 2 and "holds probes with layers=" in other.stderr, other.stderr
    assert len(other.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_after_train_probes_stopped_and_resumed_keep_every_probe_line(pretrained, tmp_path):
    """A resumed run restores the metrics file to its latest checkpoint, the probes' one once the
    probes have started: the probe epochs logged before the stop stay, none is logged twice."""
    run = copy_run(pretrained, tmp_path, "run")
    cmd = [sys.executable, "-m", "and_dist.train", "--config", "demo", f"run_dir={run}", "resume=auto",
           "data.demo_train=300", "data.demo_test=100", "data.image_size=64", "model.arch=alexnet_bn",
           "curriculum.rounds=1", "train.epochs_per_round=1", "train.batch_size=60", "eval.knn_k=10",
           "probe.after_train=true", *PROBE]
    proc = subprocess.Popen(cmd, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    latest, deadline = run / "probes" / "checkpoints" / "latest", time.time() + 120
    while not (latest.exists() and latest.read_text().strip() == "e1"):   # probe epoch 0 scored
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out + err
    assert [e["epoch"] for e in events(run, "probe")][:1] == [0]
    again = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True, timeout=300, env=ENV)
    assert again.returncode == 0, again.stdout + again.stderr
    assert [e["epoch"] for e in events(run, "probe")] == [0, 1, 2]
    assert json.loads((run / "probes.json").read_text())["finished"]



@pytest.mark.slow
def test_two_ranks_train_the_same_probes_as_one(pretrained, tmp_path):
    """The heads' BN statistics and gradient span the global batch: the split across ranks does
    not change them."""
    args = ["probe.epochs=1", "probe.batch_size=60", "probe.batch_norm=true", "probe.layers=[conv2,conv5]",
            "train.threads=1", "log.progress=false"]
    one = copy_run(pretrained, tmp_path, "one")
    assert probe("--checkpoint", str(one), *args).returncode == 0
    two = copy_run(pretrained, tmp_path, "two")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", "-m", "and_dist.probe", "--checkpoint", str(two),
                           *args], cwd=REPO, text=True, capture_output=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 rank(s)" in proc.stdout
    a, b = (json.loads((r / "probes.json").read_text())["history"][0]["layers"] for r in (one, two))
    for n in ("conv2", "conv5"):
        assert b[n]["loss"] == pytest.approx(a[n]["loss"], rel=1e-4)
        assert abs(b[n]["top1"] - a[n]["top1"]) <= 1.0        # at most one of 100 test images differs


@pytest.mark.slow
@pytest.mark.parametrize("args,needle", [
    (["probe.layers=[conv9]"], "no module 'conv9'"),
    (["probe.epochs=0"], "probe.epochs"),
])
def test_user_errors_exit_2_with_one_line(pretrained, tmp_path, args, needle):
    run = copy_run(pretrained, tmp_path, "run")
    proc = probe("--checkpoint", str(run), "log.progress=false", *args)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_missing_checkpoint_exits_2(tmp_path):
    proc = probe("--checkpoint", str(tmp_path / "nothing"))
    assert proc.returncode == 2 and "no checkpoint" in proc.stderr, proc.stderr
