"""`python -m and_dist.evaluate` and `python -m and_dist.export` on real files: a tiny trained run
evaluated by name, two probe evaluations side by side (one interrupted and continued), weights
from elsewhere (torchvision layout, DataParallel, the released AND checkpoint), a file that fits
nothing, and the torchvision export's round trip."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from and_dist import evaluate, export
from and_dist.eval.pretrained import load_model
from and_dist.eval.weights import model_from_state, find_state_dict, load_weights, match
from and_dist.models import build_model
from helpers import wandb_history

REPO = Path(__file__).parent.parent
ENV = {"PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": "/tmp"}
QUIET = ["train.threads=1", "log.progress=false"]
DATA = ["data.demo_train=100", "data.demo_test=40", "eval.knn_k=10", *QUIET]


def run_cli(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout, env=ENV)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """out_dir/name of a one-epoch AND run of ResNet-18 (ImageNet stem) on 32-px demo images."""
    out = tmp_path_factory.mktemp("evaluate")
    proc = run_cli("and_dist.train", "--config", "demo", f"out_dir={out}", "name=tiny", "data.demo_train=200",
                   "data.demo_test=50", "model.arch=resnet18", "curriculum.rounds=1", "train.epochs_per_round=1",
                   "train.batch_size=50", "eval.knn_k=10", *QUIET)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out / "tiny"


def only_run(name_dir: Path) -> Path:
    (run,) = [d for d in name_dir.iterdir() if d.is_dir()]
    return run


def evaluations(run: Path) -> list[Path]:
    return sorted((run / "evaluations").iterdir())


# ------------------------------------------------------------------------------ our own runs

@pytest.mark.slow
def test_a_run_name_evaluated_by_knn_equals_the_runs_final_knn(trained):
    run = only_run(trained)
    proc = run_cli("and_dist.evaluate", "knn", "--checkpoint", str(trained), *QUIET)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[0].startswith(f"evaluating run name {trained}: its newest run {run.name}")
    summary = json.loads((run / "summary.json").read_text())
    (done,) = evaluations(run)
    got = json.loads((done / "evaluation.json").read_text())
    assert got["finished"] and (got["knn_top1"], got["knn_top5"]) == (summary["final_knn_top1"], summary["final_knn_top5"])
    assert f"{summary['final_knn_top1']:.2f}" in proc.stdout
    # the memory bank as train features: the run's last per-epoch (bank) kNN
    assert evaluate.main(["knn", "--checkpoint", str(run), "eval.train_features=bank", *QUIET]) == 0
    banked = json.loads((evaluations(run)[-1] / "evaluation.json").read_text())
    assert banked["knn_top1"] == summary["last_bank_knn_top1"] and len(evaluations(run)) == 2


@pytest.mark.slow
def test_sigterm_during_the_knn_pass_exits_143_unfinished_and_resume_finishes_it(trained):
    """The kNN pass has no steps to checkpoint: a stop ends it at once (not at its end), the
    evaluation stays unfinished with no result in it, and resume=auto does it again. The product's
    test hook sends the SIGTERM inside the pass, once its data is built (no race)."""
    run = only_run(trained)
    before = set(evaluations(run)) if (run / "evaluations").exists() else set()
    proc = subprocess.run([sys.executable, "-m", "and_dist.evaluate", "knn", "--checkpoint", str(run), *QUIET],
                          cwd=REPO, text=True, capture_output=True, timeout=300,
                          env={**ENV, "AND_TEST_SIGNAL_AT": "knn"})
    out, err = proc.stdout, proc.stderr
    (new,) = set(evaluations(run)) - before
    record = json.loads((new / "evaluation.json").read_text())
    assert proc.returncode == 128 + signal.SIGTERM, out + err
    assert "stopped by SIGTERM" in err and "Traceback" not in err, err
    assert not record["finished"] and "knn_top1" not in record
    assert not [p for p in new.rglob(".*") if p.name != ".lock" and "wandb" not in p.parts]
    again = run_cli("and_dist.evaluate", "knn", "--checkpoint", str(run), "resume=auto", *QUIET)
    assert again.returncode == 0, again.stdout + again.stderr
    assert set(evaluations(run)) - before == {new} and json.loads((new / "evaluation.json").read_text())["finished"]


@pytest.mark.slow
def test_sigterm_during_an_export_write_leaves_neither_file(trained, tmp_path):
    """Stopped while the .pth is being written (the product's test hook sends the SIGTERM once its
    hidden temporary file is open): exit 143, and neither OUT.pth, OUT.json nor a temporary file
    is left."""
    run = only_run(trained)
    out = tmp_path / "r18.pth"
    proc = subprocess.run([sys.executable, "-m", "and_dist.export", str(run), "--to", "torchvision", str(out)],
                          cwd=REPO, text=True, capture_output=True, timeout=300,
                          env={**ENV, "AND_TEST_SIGNAL_AT": "write:.r18.pth.tmp*"})
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert list(tmp_path.iterdir()) == [] and "stopped by SIGTERM" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_two_probe_evaluations_with_other_layers_both_stay_and_an_interrupted_one_continues(trained):
    run = only_run(trained)
    before = set(evaluations(run)) if (run / "evaluations").exists() else set()
    probe = ["probe", "--checkpoint", str(run), "probe.batch_size=50", *QUIET]
    first = run_cli("and_dist.evaluate", *probe, "probe.layers=[layer1]", "probe.epochs=2", "log.wandb_mode=offline")
    assert first.returncode == 0, first.stdout + first.stderr
    (one,) = set(evaluations(run)) - before

    # the second, with other layers, stopped by SIGTERM after its first probe epoch, then continued
    cmd = [sys.executable, "-m", "and_dist.evaluate", *probe, "probe.layers=[layer2,layer4]", "probe.epochs=50"]
    proc = subprocess.Popen(cmd, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    deadline = time.time() + 120
    while not [p for p in run.glob("evaluations/*/probes/checkpoints/e1") if one not in p.parents]:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out + err
    (two,) = set(evaluations(run)) - before - {one}
    again = run_cli("and_dist.evaluate", *probe, "probe.layers=[layer2,layer4]", "probe.epochs=2", "resume=auto")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "probes: resuming" in again.stdout and set(evaluations(run)) - before == {one, two}

    first_probes = json.loads((one / "probes.json").read_text())
    second_probes = json.loads((two / "probes.json").read_text())
    assert list(first_probes["layers"]) == ["layer1"] and first_probes["epochs_done"] == 2
    assert list(second_probes["layers"]) == ["layer2", "layer4"] and second_probes["epochs_done"] == 2
    assert [r["epoch"] for r in second_probes["history"]] == [0, 1]
    assert (one / "probes" / "checkpoints" / "latest").exists() and (one / "probes.png").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert second_probes["knn_top1"] == summary["final_knn_top1"]       # the run's kNN beside the probes

    # wandb (offline): per-layer sections against the probe epoch, and the one chart by layer
    rows = wandb_history(one)
    assert [r["probe-layer1/top1"] for r in rows if "probe-layer1/top1" in r] == \
           [h["layers"]["layer1"]["top1"] for h in first_probes["history"]]
    assert [r["probe/epoch"] for r in rows if "probe-layer1/top1" in r] == [0, 1]
    assert any("evaluation/top1_table/_type" in r for r in rows)
    data = next(next((one / "wandb").glob("offline-run-*")).glob("*.wandb")).read_bytes()
    assert b"probe-layer1/*" in data and b"probe/epoch" in data          # the define_metric records


# ---------------------------------------------------------------------- weights from elsewhere

def torchvision_resnet18(seed: int = 0) -> dict:
    """A state dict in torchvision's resnet18 names and shapes, with its 1000-way classifier."""
    torch.manual_seed(seed)
    sd = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
          for k, v in build_model("resnet18").backbone.state_dict().items()}
    sd["fc.weight"], sd["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    return sd


def released_and_cifar(n: int, low_dim: int = 128) -> dict:
    """The released AND CIFAR checkpoint's layout, written out from its ResNet-18: DataParallel
    names, `shortcut.0/1` projections, a `linear` embedding, the memory bank in `npc`."""
    torch.manual_seed(1)
    net = {}

    def bn(name, c):
        net.update({f"{name}.weight": 1 + 0.1 * torch.randn(c), f"{name}.bias": 0.1 * torch.randn(c),
                    f"{name}.running_mean": 0.1 * torch.randn(c), f"{name}.running_var": 1 + torch.rand(c),
                    f"{name}.num_batches_tracked": torch.tensor(100)})

    net["conv1.weight"] = 0.1 * torch.randn(64, 3, 3, 3)
    bn("bn1", 64)
    cin = 64
    for i, c in enumerate((64, 128, 256, 512), 1):
        for b in range(2):
            p, stride = f"layer{i}.{b}", 2 if (b == 0 and i > 1) else 1
            net[f"{p}.conv1.weight"] = 0.05 * torch.randn(c, cin if b == 0 else c, 3, 3)
            bn(f"{p}.bn1", c)
            net[f"{p}.conv2.weight"] = 0.05 * torch.randn(c, c, 3, 3)
            bn(f"{p}.bn2", c)
            if b == 0 and (stride != 1 or cin != c):
                net[f"{p}.shortcut.0.weight"] = 0.1 * torch.randn(c, cin, 1, 1)
                bn(f"{p}.shortcut.1", c)
        cin = c
    net["linear.weight"], net["linear.bias"] = 0.05 * torch.randn(low_dim, 512), torch.zeros(low_dim)
    return {"net": {f"module.{k}": v for k, v in net.items()},
            "npc": {"params": torch.tensor([0.1, 0.5]), "memory": F.normalize(torch.randn(n, low_dim), dim=1)},
            "ANs_discovery": {"samples_num": torch.tensor(n), "anchor_indexes": torch.arange(n // 4),
                              "instance_indexes": torch.arange(n // 4, n), "position": -torch.ones(n, dtype=torch.long),
                              "neighbours": torch.zeros(n // 4, 1, dtype=torch.long), "entropy": torch.rand(n),
                              "consistency": torch.tensor(0.3)},
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.03, "momentum": 0.9, "params": [0, 1]}]},
            "epoch": 199, "round": 4, "acc": 86.3}


def evaluate_file(path: Path, out: Path, capsys, *extra: str) -> dict:
    assert evaluate.main(["knn", "--checkpoint", str(path), f"out_dir={out}", *DATA, *extra]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    (done,) = (out / path.stem / "evaluations").iterdir()
    return {"line": first, **json.loads((done / "evaluation.json").read_text())}


def test_a_torchvision_resnet18_and_a_dataparallel_one_load_and_evaluate(tmp_path, capsys):
    sd = torchvision_resnet18()
    torch.save(sd, tmp_path / "tv.pth")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "dp.pth")
    plain = evaluate_file(tmp_path / "tv.pth", tmp_path / "a", capsys)
    wrapped = evaluate_file(tmp_path / "dp.pth", tmp_path / "b", capsys)
    assert "as resnet18: 120 trunk tensors, its last layer dropped" in plain["line"]
    assert "['state_dict']" in wrapped["line"] and "DataParallel" in wrapped["line"]
    assert plain["finished"] and (plain["knn_top1"], plain["knn_top5"]) == (wrapped["knn_top1"], wrapped["knn_top5"])
    got = load_weights(tmp_path / "dp.pth", 128, 32).model
    want = build_model("resnet18").backbone
    want.load_state_dict({k: v for k, v in sd.items() if not k.startswith("fc.")})
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(got(x), F.normalize(want.eval()(x), dim=1))


def test_a_torchvision_alexnet_with_dataparallel_on_features_matches():
    """In memory: the file would be 250 MB (the file path is the same as for the ResNets)."""
    torch.manual_seed(0)
    sd = {k.removeprefix("backbone."): torch.randn_like(v) for k, v in build_model("alexnet", 128, 64).state_dict().items()
          if k.startswith("backbone.")}
    sd = {k.replace("features.", "features.module."): v for k, v in sd.items()}
    sd["classifier.6.weight"], sd["classifier.6.bias"] = torch.randn(1000, 4096), torch.randn(1000)
    found, where = find_state_dict({"epoch": 90, "model": sd})
    arch, ours = match(found, 128, 64)
    model, has_head = model_from_state(arch, ours, 128, 64)
    assert (where, arch, has_head) == ("['model']", "alexnet", False)
    assert torch.equal(model.backbone.features[0].weight, sd["features.module.0.weight"])
    assert torch.equal(model.backbone.classifier[4].bias, sd["classifier.4.bias"])


@pytest.mark.slow
def test_the_released_and_cifar_checkpoint_loads_and_its_bank_serves_the_knn(tmp_path, capsys):
    from and_dist.platform import dist
    from and_dist.config import Config
    from and_dist.data import build_data
    from and_dist.eval.knn import knn_eval
    ckpt = released_and_cifar(100)
    torch.save(ckpt, tmp_path / "and_cifar.t7")
    recomputed = evaluate_file(tmp_path / "and_cifar.t7", tmp_path / "a", capsys)
    banked = evaluate_file(tmp_path / "and_cifar.t7", tmp_path / "b", capsys, "eval.train_features=bank")
    assert recomputed["line"].startswith("evaluating weights file")
    assert "the released AND checkpoint as resnet18_cifar" in recomputed["line"] and "128-d head kept" in recomputed["line"]
    assert "memory bank (100, 128)" in recomputed["line"] and "round 4" in recomputed["line"]
    got = load_weights(tmp_path / "and_cifar.t7", 128, 32)
    assert torch.equal(got.model.head.weight, ckpt["net"]["module.linear.weight"])
    assert torch.equal(got.model.backbone.layer2[0].downsample[0].weight, ckpt["net"]["module.layer2.0.shortcut.0.weight"])
    cfg = Config()
    cfg.data.demo_train, cfg.data.demo_test = 100, 40
    env = dist.init("cpu")
    want = knn_eval(got.model, build_data(cfg, env, None, lambda *_: None, False), env, 10, 0.1, ckpt["npc"]["memory"])
    assert (banked["knn_top1"], banked["knn_top5"]) == want


@pytest.mark.slow
def test_a_file_that_fits_no_architecture_is_one_line_exit_2(tmp_path):
    sd = {k: v for k, v in torchvision_resnet18().items() if not k.startswith("layer4.")}
    sd["extra.weight"] = torch.zeros(3)
    torch.save({"model": sd}, tmp_path / "odd.pth")
    proc = run_cli("and_dist.evaluate", "knn", "--checkpoint", str(tmp_path / "odd.pth"), f"out_dir={tmp_path}", *DATA)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "match no architecture (tried resnet18_cifar, resnet18, resnet50" in line
    assert "closest resnet18: missing layer4.0.bn1.bias" in line and "unexpected extra.weight" in line
    assert "Traceback" not in proc.stdout + proc.stderr and not (tmp_path / "odd").exists()


# ----------------------------------------------------------------------------------- export

@pytest.mark.slow
def test_export_to_torchvision_round_trips_the_features_exactly(trained, tmp_path, capsys):
    run = only_run(trained)
    out = tmp_path / "r18.pth"
    assert export.main([str(run), "--to", "torchvision", str(out)]) == 0
    sd = torch.load(out, weights_only=True)
    # torchvision's resnet18 state dict: 122 tensors, of which only fc.weight/fc.bias are left out
    assert len(sd) == 120 and not any(k.startswith(("fc.", "head.", "backbone.")) for k in sd)
    assert sd["conv1.weight"].shape == (64, 3, 7, 7) and sd["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert sd["layer4.1.bn2.running_var"].shape == (512,)
    info = json.loads(out.with_suffix(".json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert info["torchvision"] == "resnet18" and info["missing_when_loaded"] == ["fc.weight", "fc.bias"]
    assert (info["feature_dim"], info["embedding_dim"], info["input_size"]) == (512, 128, 32)
    assert info["knn"]["top1"] == summary["final_knn_top1"] and len(info["mean"]) == len(info["std"]) == 3
    own, _, _ = load_model(run)
    back = load_weights(out, 128, 32)
    assert back.arch == "resnet18" and not back.has_head
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back.model.backbone(x), own.backbone(x))
    assert export.main([str(out), "--to", "torchvision", str(tmp_path / "again.pth")]) == 2
