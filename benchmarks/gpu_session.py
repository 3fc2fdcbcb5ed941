"""One prepared device session: everything the CUDA path needs checked and measured, in one call.

Why one script: a device lease is short (minutes) and a machine there has only torch, triton,
pillow, pyyaml, tqdm, matplotlib and scipy (no DALI, faiss, wandb, submitit, nothing downloaded),
so every part runs from this working tree, generates its own data, and is time-boxed: a part (or
an item of one) that no longer fits the budget is skipped with a line saying so. In order of value:

  a  correctness: tests/test_gpu.py and the CUDA tests of tests/test_attention.py (when pytest is
     there), and the AND step's loss and gradient with the attention kernel and the discovery
     kernels against the exact path, bank in fp32 and bf16; a check fails on any NaN.
  b  end to end: the demo (bf16 on CUDA, compiled jitter, prefetch) stopped by SIGTERM and resumed;
     AlexNet-BN on a generated ImageNet-layout tree of full-size JPEGs, data.loader=torch,
     2 rounds, probes after training.
  c  throughput (train_throughput.run_case): trainer img/s against the model's own forward +
     backward, prefetch on and off, compile off then on, and the input-stall share.
  d  bank step and discovery at N = 1,281,167 (bank_step.single, discovery_scale.single): time,
     peak memory beyond the bank, anchors against the exact path on a structured bank.

It prints one table last and writes it as markdown, <out>/<YYYY-MM-DD>-<device>.md, with the
commit, the device and the command.

Run:  python benchmarks/gpu_session.py --out $OUT --commit <hash>          # on the GPU, <= 8 min
      python benchmarks/gpu_session.py --device cpu --quick --out /tmp/s   # CI smoke, < 60 s
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from common import REPO, MiB

sys.path.insert(0, str(REPO))
# pytest is not on the device machine: a copy carried in this (git-ignored) folder is used if there
# (fill it with: cp -r <site-packages>/{pytest,_pytest,pluggy,iniconfig,packaging,py.py} .device_deps/)
DEPS = REPO / ".device_deps"
FULL_N = 1_281_167
TIMEOUT = "time-out"
# Share of the budget each part may use; what a part leaves unused passes to the next ones.
BOXES = {"a": 0.26, "b": 0.30, "c": 0.28, "d": 0.16}


class Session:
    def __init__(self, args):
        self.args, self.rows = args, []
        self.start = time.time()
        self.part_end = self.start
        self.cuda = torch.device(args.device).type == "cuda"
        self.dev = torch.device(args.device)

    def left(self) -> float:
        """Seconds left to the current part (its box plus what earlier parts left unused)."""
        return min(self.part_end, self.start + self.args.budget) - time.time()

    def fits(self, part: str, item: str, need: float) -> bool:
        if self.left() >= need:
            return True
        self.add(part, item, f"skipped: needs ~{need:.0f} s, {max(self.left(), 0):.0f} s left in the part", None)
        return False

    def add(self, part: str, check: str, result: str, ok: bool | None | str) -> None:
        """ok: True/False for a check, None for a measurement or a skip, TIMEOUT for an item that
        ran past its box (not a failure: it did not fit; the line says after how long)."""
        status = {True: "ok", False: "FAIL", None: ""}.get(ok, ok)
        self.rows.append((part, check, result, status))
        print(f"[{part}] {check}: {result} {status}", flush=True)

    def timeout(self, part: str, check: str, t0: float) -> None:
        self.add(part, check, f"stopped: ran past its box after {time.time() - t0:.0f} s", TIMEOUT)

    def env(self) -> dict:
        """The environment of a child process: this tree first on the path; CPU runs see no GPU."""
        paths = (os.environ.get("PYTHONPATH", ""), str(REPO), str(DEPS) if DEPS.is_dir() else "")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
        if not self.cuda:
            env["CUDA_VISIBLE_DEVICES"] = ""
            env.setdefault("OMP_NUM_THREADS", "1")
        return env


def agree(got: torch.Tensor, want: torch.Tensor, tol: float) -> tuple[bool, float]:
    """(every value finite and max |got - want| <= tol * max(|want|, 1e-12), that relative error).
    A NaN or inf anywhere fails (a max over NaN compares False, but it is checked explicitly too)."""
    got, want = got.double().cpu(), want.double().cpu()
    err = ((got - want).abs().max() / want.abs().max().clamp(min=1e-12)).item()
    return bool(torch.isfinite(got).all() and torch.isfinite(want).all() and err <= tol), err


# ----------------------------------------------------------------------------------- part a

def part_a(s: Session) -> None:
    q = s.args.quick
    if DEPS.is_dir():
        sys.path.append(str(DEPS))
    try:
        import pytest  # noqa: F401
        have_pytest = True
    except ImportError:
        have_pytest = False
    if not s.cuda:
        s.add("a", "tests/test_gpu.py + CUDA tests of test_attention.py", "skipped: no CUDA device (each test needs one)", None)
    elif not have_pytest:
        s.add("a", "tests/test_gpu.py + CUDA tests of test_attention.py", "skipped: pytest is not installed here", None)
    elif s.fits("a", "tests/test_gpu.py + CUDA tests of test_attention.py", 20):
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py",
               "tests/test_attention.py", "-k", "cuda"]
        env = {**s.env(), **({"AND_TEST_GPUS": os.environ.get("CUDA_VISIBLE_DEVICES", "all")} if s.cuda else {})}
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, text=True, capture_output=True, timeout=max(s.left() - 15, 5))
            summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
            ok = proc.returncode == 0 and "failed" not in summary and "error" not in summary
            if s.cuda:
                ok = ok and "passed" in summary
            s.add("a", "tests/test_gpu.py + CUDA tests of test_attention.py", summary.strip("= "), ok)
            if not ok:
                print(proc.stdout[-4000:] + proc.stderr[-2000:], flush=True)
        except subprocess.TimeoutExpired:
            s.timeout("a", "tests/test_gpu.py + CUDA tests of test_attention.py", t0)
    kernel_checks(s, n=4000 if q else 300_000, batch=32 if q else 256, disc_n=3000 if q else 20_000)


def kernel_checks(s: Session, n: int, batch: int, disc_n: int) -> None:
    """The AND step's loss and gradient, and discovery, with each kernel against the exact path."""
    import torch.nn.functional as F

    from and_dist.method.attention import shard_terms_attention, supported
    from and_dist.method.bank import ShardedBank
    from and_dist.method.curriculum import anchor_count, positive_sets, select_anchors
    from and_dist.method.discovery import discover, fused_available
    from and_dist.method.loss import and_loss, shard_terms
    from common import structured_rows

    dev = s.dev
    g = torch.Generator(device=dev).manual_seed(5)
    rows = structured_rows(n, 128, device=dev)
    anchor = torch.rand(n, generator=g, device=dev) < 0.25
    neighbours = torch.randint(0, n, (n, 1), generator=g, device=dev)
    idx = torch.randperm(n, generator=g, device=dev)[:batch]
    feats = F.normalize(rows[idx] + 0.1 * torch.randn(batch, 128, generator=g, device=dev), dim=1)
    positives = positive_sets(idx, anchor, neighbours)

    def step(dtype, fn):
        bank = ShardedBank(n, 128, device=dev, dtype=dtype)
        bank.rows.copy_(rows.to(dtype))
        x = feats.clone().requires_grad_()
        objective, losses, _ = and_loss(x, positives, bank, [batch], fn)
        objective.backward()
        return losses.detach(), x.grad

    truth = step(torch.float64, shard_terms)              # the reference: the exact path in float64
    poisoned = truth[0].clone()
    poisoned[0] = float("nan")
    s.add("a", "a NaN in a kernel's output fails the check", "rejected" if not agree(poisoned, truth[0], 1.0)[0]
          else "PASSED (the check is broken)", not agree(poisoned, truth[0], 1.0)[0])
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        name = str(dtype).split(".")[1]
        for kernel, fn in (("exact", shard_terms), ("attention", shard_terms_attention)):
            if kernel == "attention" and not supported(dev, dtype):
                s.add("a", f"AND step {kernel} bank {name} N={n}", f"skipped: no attention kernel for {name} on {dev.type}", None)
                continue
            losses, grad = step(dtype, fn)
            ok_l, e_l = agree(losses, truth[0], tol)
            ok_g, e_g = agree(grad, truth[1], tol * 10)
            s.add("a", f"AND step {kernel} bank {name} N={n} vs float64", f"rel err loss {e_l:.1e} grad {e_g:.1e}", ok_l and ok_g)

    bank = ShardedBank(disc_n, 128, temperature=0.1, device=dev)
    bank.rows.copy_(structured_rows(disc_n, 128, seed=2, device=dev))
    count = anchor_count(1, disc_n, 0.25)
    ref = discover(bank, 1, kernel="exact", precision="fp32")
    ref_anchors = select_anchors(ref.entropy, count)
    methods = [("exact", "bf16", 0.05, 0.99), ("attention", "fp32", 1e-4, 0.999), ("attention", "bf16", 0.05, 0.99)]
    if fused_available(dev):
        methods += [("fused", "bf16x3", 3e-4, 0.999), ("fused", "bf16", 0.1, 0.99)]
    for kernel, precision, tol, share in methods:
        if not s.fits("a", f"discovery {kernel}/{precision}", 5):
            continue
        got = discover(bank, 1, kernel=kernel, precision=precision)
        dh = (got.entropy - ref.entropy).abs().max().item()
        same = (select_anchors(got.entropy, count) & ref_anchors).sum().item() / max(count, 1)
        ok = math.isfinite(dh) and bool(torch.isfinite(got.entropy).all()) and dh <= tol and same >= share
        s.add("a", f"discovery {kernel}/{precision} N={disc_n} vs exact fp32",
              f"max |dH| {dh:.1e}, anchors equal {same:.4f}", ok)


# ----------------------------------------------------------------------------------- part b

def part_b(s: Session) -> None:
    q = s.args.quick
    if s.fits("b", "demo stopped by SIGTERM and resumed", 15 if q else 60):
        demo_stop_resume(s)
    if s.fits("b", "AlexNet-BN ImageNet layout, torch loader, 2 rounds + probes", 15 if q else 60):
        alexnet_run(s)


def fresh(path: Path) -> Path:
    """An empty run directory (a rerun with the same --work must not resume an old run)."""
    shutil.rmtree(path, ignore_errors=True)
    return path


def _train_cmd(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "and_dist.train", *overrides]


def _events(run: Path, kind: str) -> list[dict]:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def _epochs_summary(run: Path) -> tuple[bool, str]:
    """Finite losses and a consistent stall split on every epoch event, and the figures."""
    epochs = _events(run, "epoch")
    ok = bool(epochs) and all(e["loss"] is not None and math.isfinite(e["loss"]) and e["data_wait_share"] is not None
                              and abs(e["data_wait_ms"] + e["compute_ms"] - e["step_ms"]) < 1e-6 for e in epochs)
    last = epochs[-1] if epochs else {}
    return ok, (f"{len(epochs)} epochs, last {last.get('images_per_s', float('nan')):.0f} img/s, data wait "
                f"{100 * (last.get('data_wait_share') or float('nan')):.0f}% of {last.get('step_ms') or float('nan'):.1f} ms/step")


def demo_stop_resume(s: Session) -> None:
    run = fresh(Path(s.args.work) / "demo")
    cuda = ["train.precision=bf16", "data.compile_augment=true"] if s.cuda else ["train.threads=1"]
    size = ["data.demo_train=300", "data.demo_test=100", "train.batch_size=50", "eval.knn_k=10"] if s.args.quick \
        else ["data.demo_train=5000", "data.demo_test=1000", "train.batch_size=256"]
    args = _train_cmd("--config", "demo", f"train.device={s.args.device}", "data.prefetch=2", *cuda, *size,
                      "curriculum.rounds=2", "train.epochs_per_round=2", "checkpoint.every_epochs=1",
                      "eval.every_epochs=0", "log.progress=false", "log.wandb_mode=disabled", f"run_dir={run}")
    t0 = time.time()
    proc = subprocess.Popen(args, cwd=REPO, env=s.env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first = run / "checkpoints" / "latest"
    while not first.exists() and proc.poll() is None and time.time() - t0 < s.left() - 10:
        time.sleep(0.05)
    if proc.poll() is None and not first.exists():
        proc.kill()
        proc.communicate()
        s.timeout("b", "demo stopped by SIGTERM", t0)
        return
    if not first.exists():
        out = proc.communicate()[0]
        s.add("b", "demo stopped by SIGTERM", f"ended before its first checkpoint (exit {proc.returncode})", False)
        print(out[-3000:], flush=True)
        return
    proc.send_signal(signal.SIGTERM)
    try:
        out = proc.communicate(timeout=max(s.left(), 10))[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        s.timeout("b", "demo stopped by SIGTERM", t0)
        return
    stopped = proc.returncode == 128 + signal.SIGTERM and "stopped by signal" in out
    s.add("b", "demo stopped by SIGTERM", f"exit {proc.returncode} after {time.time() - t0:.0f} s", stopped)
    t1 = time.time()
    try:
        again = subprocess.run([*args, "resume=auto"], cwd=REPO, env=s.env(), text=True, capture_output=True,
                               timeout=max(s.left(), 10))
    except subprocess.TimeoutExpired:
        s.timeout("b", "demo resumed", t1)
        return
    text = again.stdout + again.stderr
    finished = again.returncode == 0 and (run / "summary.json").exists() and "resuming" in text
    eager = s.cuda and "running it eagerly" in text
    ok, figures = _epochs_summary(run)
    if finished:
        figures += f", final kNN {json.loads((run / 'summary.json').read_text())['final_knn_top1']:.1f}"
    s.add("b", "demo resumed to the end" + (" (jitter compiled)" if s.cuda else ""),
          figures + (" -- the jitter ran eagerly" if eager else ""), finished and ok and len(_events(run, "epoch")) == 4 and not eager)
    if not finished:
        print(text[-3000:], flush=True)


def _image(args) -> None:
    """One JPEG of a class: a smooth random picture tinted by its class (so kNN beats chance)."""
    from PIL import Image
    import numpy as np
    path, cls, seed, (h, w) = args
    rng = np.random.RandomState(seed)
    small = rng.randint(0, 256, (6, 8, 3)).astype(np.float32)
    small = 0.5 * small + 0.5 * np.array([(cls * 71) % 256, (cls * 151) % 256, (cls * 37) % 256], np.float32)
    Image.fromarray(small.astype(np.uint8)).resize((w, h), Image.BICUBIC).save(path, quality=90)


def jpeg_tree(root: Path, classes: int, train: int, test: int, sizes) -> Path:
    """An ImageFolder tree train/ + val/ of `classes` folders of full-size JPEGs, made in parallel."""
    if (root / "done").exists():
        return root
    jobs = []
    for split, count in (("train", train), ("val", test)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                seed = 1_000_003 * (split == "val") + 1009 * c + i
                jobs.append((str(folder / f"{c}_{i}.JPEG"), c, seed, sizes[seed % len(sizes)]))
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        list(pool.map(_image, jobs))
    (root / "done").write_text("")
    return root


def _tree(s: Session) -> Path:
    if s.args.quick:
        return jpeg_tree(Path(s.args.work) / "tree", 2, 16, 6, [(120, 160), (160, 120)])
    return jpeg_tree(Path(s.args.work) / "tree", 10, 280, 30, [(375, 500), (500, 375), (333, 500), (500, 333)])


def alexnet_run(s: Session) -> None:
    t0 = time.time()
    tree = _tree(s)
    made = time.time() - t0
    run = fresh(Path(s.args.work) / "alexnet")
    q = s.args.quick
    size = ["data.image_size=64", "train.batch_size=16", "probe.batch_size=16", "data.workers=0",
            "probe.layers=[conv1,conv5]", "train.threads=1"] if q else \
        ["train.batch_size=256", "probe.batch_size=256", f"data.workers={max(2, (os.cpu_count() or 4) - 2)}"]
    args = _train_cmd("--config", "imagenet_alexnet", f"data.root={tree}", "data.loader=torch",
                      f"train.device={s.args.device}", "discovery.backend=torch", "curriculum.rounds=2",
                      "train.epochs_per_round=1", "eval.every_epochs=0", "eval.knn_k=10", "checkpoint.every_epochs=0",
                      "probe.after_train=true", "probe.epochs=1", "probe.lr_decay_epochs=[]", *size,
                      "log.progress=false", "log.wandb_mode=disabled", f"run_dir={run}")
    try:
        proc = subprocess.run(args, cwd=REPO, env=s.env(), text=True, capture_output=True, timeout=max(s.left(), 10))
    except subprocess.TimeoutExpired:
        s.timeout("b", "AlexNet-BN ImageNet layout, torch loader", t0 + made)
        return
    text = proc.stdout + proc.stderr
    probes = sorted(run.rglob("probes.json"))
    ok, figures = _epochs_summary(run)
    rounds = _events(run, "round")
    ok = ok and proc.returncode == 0 and len(rounds) == 2 and bool(probes)
    if probes:
        result = json.loads(probes[0].read_text())
        top1 = {k: v for k, v in _flat(result).items() if "top1" in k}
        figures += "; probes " + ", ".join(f"{k} {v:.1f}" for k, v in list(top1.items())[:5])
    s.add("b", f"AlexNet-BN {'64' if q else '224'} px on generated JPEGs (torch loader), 2 rounds + probes",
          f"{figures}; tree made in {made:.0f} s, run {time.time() - t0 - made:.0f} s", ok)
    if not ok:
        print(text[-4000:], flush=True)


def _flat(d, prefix="") -> dict:
    out = {}
    for k, v in (d.items() if isinstance(d, dict) else []):
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


# ----------------------------------------------------------------------------------- part c

def part_c(s: Session) -> None:
    import train_throughput as tt
    q = s.args.quick
    if s.cuda:
        torch.backends.cudnn.benchmark = True
    tree = str(_tree(s))
    cases = [("convnet_small", 32, 16, ""), ("alexnet_bn", 64, 4, tree)] if q else \
        [("resnet18_cifar", 32, 128, ""), ("resnet18_cifar", 32, 512, ""), ("alexnet_bn", 224, 256, tree)]
    steps = 1 if q else 30
    need = {False: 10 if q else 25, True: 60}
    for compile_ in (False, True):
        for arch, size, batch, root in cases:
            what = f"{arch} {size} px batch {batch} {'torch loader' if root else 'in memory'}, compile {'on' if compile_ else 'off'}"
            if compile_ and q:
                s.add("c", what, "skipped: --quick (compiling takes minutes on a CPU)", None)
                continue
            if not s.fits("c", what, need[compile_] * (2 if size > 96 else 1)):
                continue
            r = tt.run_case(arch, size, batch, 50_000 if not q else 256, s.args.device, "auto", compile_, 2,
                            steps if not root or q else steps * 2 // 3, syncs=s.cuda, root=root,
                            warmup=2 if q else 3, workers=0 if q else max(2, (os.cpu_count() or 4) - 2))
            s.add("c", what,
                  f"trainer {r['trainer']:.0f} img/s (prefetch 0: {r['serial']:.0f}), model {r['model']:.0f} img/s, "
                  f"trainer/model {r['ratio']:.2f}; data wait {100 * r['wait_share']:.0f}% "
                  f"({r['wait_ms']:.2f} of {r['step_ms']:.2f} ms/step), data alone {r['data']:.0f} img/s"
                  + (f", {r['syncs']:.1f} syncs/step" if s.cuda else "")
                  + (target(r["ratio"], 0.9, "trainer/model", larger=True) if s.cuda and arch == "resnet18_cifar" else ""),
                  None)


# ----------------------------------------------------------------------------------- part d

def part_d(s: Session) -> None:
    import bank_step
    import discovery_scale
    q = s.args.quick
    n = 5_000 if q else FULL_N
    if s.fits("d", f"bank step N={n}", 5 if q else 20):
        rows = bank_step.single(types.SimpleNamespace(
            device=s.args.device, sizes=[n], steps=3 if q else 20, batch=64 if q else 256, dim=128,
            released_max=0, threads=0, profile=False))
        for r in rows:
            s.add("d", f"bank step {r['method']} N={n}",
                  f"{r['ms']:.2f} ms wall" + (f", {r['gpu_ms']:.2f} ms GPU" if s.cuda else "")
                  + f", peak {r['peak_bytes'] / MiB:.0f} MiB beyond the bank, |dloss| {r['dloss']:.1e}"
                  + (target(r["ms"], 1.5, "ms wall") if s.cuda and r["method"] == "attention" else ""), None)
    if s.fits("d", f"discovery N={n}", 10 if q else 40):
        rows = discovery_scale.single(types.SimpleNamespace(
            device=s.args.device, sizes=[n], dim=128, chunk="auto", banks=["structured"], rate=0.25,
            released_max=0, loop_sample=0, skip=[], threads=0))
        for r in rows:
            s.add("d", f"discovery {r['method']} N={n} structured",
                  f"{r['seconds']:.2f} s, peak {r['peak_bytes'] / MiB:.0f} MiB beyond the bank, anchors equal "
                  f"{r['anchors_equal']:.5f}, max |dH| {r['max_dh']:.1e}"
                  + (target(r["seconds"], 3.0, "s") if s.cuda and r["method"] == "fused/bf16x3" else ""),
                  None if r["method"].endswith("/bf16") else r["anchors_equal"] >= 0.999)   # bf16: measured only


def target(value: float, goal: float, unit: str, larger: bool = False) -> str:
    """Against issue 16's target: met, or missed by how much (a figure, not a check)."""
    met = value >= goal if larger else value <= goal
    return f"; target {goal:g} {unit}: " + ("met" if met else f"missed by {abs(value - goal):.2f}")


# ----------------------------------------------------------------------------------- table

PARTS = (("a", "correctness", part_a), ("b", "end to end", part_b), ("c", "throughput", part_c),
         ("d", "bank step and discovery", part_d))


def device_name(s: Session) -> str:
    return torch.cuda.get_device_name(s.dev) if s.cuda else f"cpu x{os.cpu_count()}"


def commit(given: str) -> str:
    if given:
        return given
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, text=True, capture_output=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, text=True,
                               capture_output=True, check=True).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (pass --commit)"


def write_table(s: Session, command: str) -> Path:
    name = device_name(s)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    path = Path(s.args.out) / f"{datetime.date.today().isoformat()}-{slug}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# Device session {datetime.date.today().isoformat()}: {name}", "",
             f"- commit: `{commit(s.args.commit)}`", f"- device: {name}, torch {torch.__version__}"
             + (f", CUDA {torch.version.cuda}" if s.cuda else ""),
             f"- command: `{command}`", f"- wall: {time.time() - s.start:.0f} s of a {s.args.budget:.0f} s budget", "",
             "| part | check | result | status |", "|---|---|---|---|"]
    lines += [f"| {p} | {c} | {r.replace('|', chr(92) + '|')} | {k} |" for p, c, r, k in s.rows]
    path.write_text("\n".join(lines) + "\n")
    width = max(len(c) for _, c, _, _ in s.rows)
    print("\n" + "\n".join(f"{p}  {c:<{width}}  {k:<4}  {r}" for p, c, r, k in s.rows), flush=True)
    print(f"table written to {path}", flush=True)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes: the CPU smoke test of every part")
    ap.add_argument("--budget", type=float, default=None, help="seconds for all parts (default 450, quick 55)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="folder of the markdown table")
    ap.add_argument("--work", default=None, help="folder for generated data and runs (default: a temp folder)")
    ap.add_argument("--commit", default="", help="commit hash to record (default: git rev-parse HEAD)")
    ap.add_argument("--parts", default="abcd", help="which parts to run, e.g. cd")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    args.budget = args.budget or (55.0 if args.quick else 450.0)
    args.work = args.work or tempfile.mkdtemp(prefix="gpu_session-")
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    if args.device == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    s = Session(args)
    print(f"device {device_name(s)}, torch {torch.__version__}, budget {args.budget:.0f} s, work {args.work}", flush=True)
    for key, title, fn in PARTS:
        s.part_end += BOXES[key] * args.budget
        if key not in args.parts:
            s.add(key, title, "skipped: not in --parts", None)
            continue
        if s.left() < 3:
            s.add(key, title, f"skipped: {max(s.left(), 0):.0f} s left of the budget", None)
            continue
        t0 = time.time()
        try:
            fn(s)
        except Exception as e:  # noqa: BLE001 - one part's failure must not cost the others' results
            s.add(key, title, f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", False)
            import traceback
            traceback.print_exc()
        print(f"[{key}] {title}: {time.time() - t0:.0f} s", flush=True)
    write_table(s, command)
    return 1 if any(k == "FAIL" for *_, k in s.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
