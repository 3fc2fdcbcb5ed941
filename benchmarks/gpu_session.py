"""One prepared device session: everything the CUDA path needs checked and measured, in one call.

Why one script: a device lease is short (15 minutes, 1-2 of them to start, one command at most
600 s) and a machine there has torch, triton, pytest, pillow, pyyaml, tqdm, matplotlib and scipy
(no DALI, faiss, wandb, submitit, nothing downloaded), so every part runs from this working tree,
generates its own data (part e reads CIFAR-10 carried in, checked before anything else), and is
time-boxed: a part (or an item of one) that no longer fits the budget is skipped with a line
saying so. In order of value:

  a  correctness: the CUDA tests of tests/test_attention.py (with 2 GPUs tests/test_gpu.py too)
     when pytest is there, and the AND step's loss and gradient with the attention kernel and the
     discovery kernels against the exact path, bank in fp32 and bf16; a check fails on any NaN.
  b  end to end: the demo (bf16 on CUDA, compiled jitter, prefetch) stopped by SIGTERM and resumed;
     AlexNet-BN on a generated ImageNet-layout tree of full-size JPEGs, data.loader=torch,
     2 rounds, probes after training.
  c  throughput (train_throughput.run_case): trainer img/s against the model's own forward +
     backward, prefetch on and off, and the input-stall share: part e's case (resnet18_cifar
     batch 512), a profile of it (and_dist.run.profile: top ops, the GPU's idle share), AlexNet-BN
     224 px on the torch loader, then part e's case compiled.
  d  bank step and discovery at N = 1,281,167 (bank_step.single, discovery_scale.single): time,
     peak memory beyond the bank, anchors against the exact path on a structured bank.
  e  fidelity: configs/fidelity_cifar10_gpu.yaml (instance discrimination, ResNet-18, all of
     CIFAR-10 from --cifar, 200 epochs) through the trainer, final kNN beside the paper's 80.8.
     Started only if part c's img/s projects it whole inside what is left (else its row names the
     lease of its own it needs); stopped by SIGTERM before the budget ends; its metrics.jsonl and
     row are brought to <out> every 30 s while it runs.

The budget counts from the script's start. Its default, 540 s, leaves the start-up, the writing
and a margin inside one 600 s command; parts a-d get the boxes their items need on a cold machine
(about 410 s), so in the shared call e runs only on a fast GPU, and otherwise needs a lease of its
own (--parts e). Parts c and d run as child processes with their part's deadline. What comes back
in <out> (at most 4 files, flat): <date>-<device>.md (the table, rewritten after every part, with
the commit, the device and the command), its -session.log, -profile.txt and
-fidelity-metrics.jsonl.

Run:  python3 benchmarks/gpu_session.py --out $OUT --commit <hash>                    # on the GPU
      python3 benchmarks/gpu_session.py --parts e --out $OUT --cifar PATH             # part e alone
      python3 benchmarks/gpu_session.py --device cpu --quick --out /tmp/s             # CI smoke
"""
from __future__ import annotations

import time

START = time.time()           # the budget counts from here: importing torch takes up to ~20 s on a cold machine

import argparse  # noqa: E402
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common import REPO
from gpu_data import fidelity_data
from gpu_parts import COMMAND_S, MAX_BUDGET, TIMEOUT, Child, part_a, part_b, part_c, part_d, part_e

sys.path.insert(0, str(REPO))
# Share of the budget each part may use; what a part leaves unused passes to the next ones. At the
# default 540 s: a 43 (pytest 20 + kernel checks), b 124 (demo 60 + AlexNet 60), c 146 (e's case 20,
# its profile 25, AlexNet 224 px 40, compiled 60), d 97 (bank step 20, discovery 75), e 130. --quick:
# tiny sizes, where the demo costs most.
BOXES = {"a": 0.08, "b": 0.23, "c": 0.27, "d": 0.18, "e": 0.24}
QUICK_BOXES = {"a": 0.10, "b": 0.35, "c": 0.20, "d": 0.12, "e": 0.23}
GRACE_S = 10             # a child part gets this long past its deadline before it is killed


class Session:
    def __init__(self, args):
        self.args, self.rows = args, []
        self.command = "python3 " + " ".join(shlex.quote(a) for a in sys.argv)
        self.rates = {}          # (arch, batch) -> trainer img/s measured by part c (compile off)
        self.start = time.time() if args.child else START
        self.part_end = args.deadline if args.child else self.start
        self.cuda = torch.device(args.device).type == "cuda"
        self.dev = torch.device(args.device)
        self.carry = None        # part e's data, checked at the start (fidelity_data)
        self.live = {}           # (part, check) -> index of a row rewritten while its item runs

    def left(self) -> float:
        """Seconds left to the current part (its box plus what earlier parts left unused)."""
        return min(self.part_end, self.start + self.args.budget) - time.time()

    def fits(self, part: str, item: str, need: float) -> bool:
        if self.left() >= need:
            return True
        self.add(part, item, f"skipped: needs ~{need:.0f} s, {max(self.left(), 0):.0f} s left in the part", None)
        return False

    def add(self, part: str, check: str, result: str, ok: bool | None | str, live: bool = False) -> None:
        """ok: True/False for a check, None for a measurement or a skip, TIMEOUT for an item that
        ran past its box (not a failure: it did not fit; the line says after how long). A `live`
        row is rewritten in place by the next add of the same (part, check)."""
        status = {True: "ok", False: "FAIL", None: ""}.get(ok, ok)
        row = (part, check, result, status)
        if (part, check) in self.live:
            self.rows[self.live[(part, check)]] = row
        else:
            if live:
                self.live[(part, check)] = len(self.rows)
            self.rows.append(row)
        print(f"[{part}] {check}: {result} {status}", flush=True)
        if self.args.child:           # what a child part measured survives its kill (written whole)
            path = Path(self.args.work, f"part-{part}.json")
            path.with_suffix(".tmp").write_text(json.dumps(
                {"rows": self.rows, "rates": [[*k, v] for k, v in self.rates.items()]}))
            path.with_suffix(".tmp").replace(path)

    def out_file(self, suffix: str) -> Path:
        """<out>/<YYYY-MM-DD>-<device><suffix>: every file that comes back lies flat in --out."""
        slug = re.sub(r"[^a-z0-9]+", "-", device_name(self).lower()).strip("-")
        path = Path(self.args.out) / f"{datetime.date.today().isoformat()}-{slug}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def write_table(self, final: bool = False) -> Path:
        """The markdown table of every row so far (rewritten after each part); `final` also prints it."""
        name, path = device_name(self), self.out_file(".md")
        lines = [f"# Device session {datetime.date.today().isoformat()}: {name}", "",
                 f"- commit: `{commit(self.args.commit)}`", f"- device: {name}, torch {torch.__version__}"
                 + (f", CUDA {torch.version.cuda}" if self.cuda else ""),
                 f"- command: `{self.command}`",
                 f"- wall: {time.time() - self.start:.0f} s of a {self.args.budget:.0f} s budget", "",
                 "| part | check | result | status |", "|---|---|---|---|"]
        lines += [f"| {p} | {c} | {r.replace('|', chr(92) + '|')} | {k} |" for p, c, r, k in self.rows]
        path.write_text("\n".join(lines) + "\n")
        if not final:
            return path
        width = max(len(c) for _, c, _, _ in self.rows)
        print("\n" + "\n".join(f"{p}  {c:<{width}}  {k:<4}  {r}" for p, c, r, k in self.rows), flush=True)
        print(f"table written to {path}", flush=True)
        return path

    def timeout(self, part: str, check: str, t0: float) -> None:
        self.add(part, check, f"stopped: ran past its box after {time.time() - t0:.0f} s", TIMEOUT)

    def env(self) -> dict:
        """The environment of a child process: this tree on the path; CPU runs see no GPU."""
        paths = (os.environ.get("PYTHONPATH", ""), str(REPO))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
        if not self.cuda:
            env["CUDA_VISIBLE_DEVICES"] = ""
            env.setdefault("OMP_NUM_THREADS", "1")
        return env


def in_child(s: Session, key: str, title: str) -> None:
    """Part `key` in a child process with the part's deadline: a hung compile or a DataLoader
    stuck on a small /dev/shm costs this part only, and the GPU memory it held goes with it."""
    rows = Path(s.args.work) / f"part-{key}.json"
    rows.unlink(missing_ok=True)
    deadline = min(s.part_end, s.start + s.args.budget)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", key, "--deadline", repr(deadline),
           "--device", s.args.device, "--work", s.args.work, "--out", s.args.out, "--budget", str(s.args.budget),
           *(["--quick"] if s.args.quick else []), *(["--cifar", s.args.cifar] if s.args.cifar else [])]
    t0 = time.time()
    child = Child(cmd, s.env(), echo=True)
    finished = child.run(deadline + GRACE_S, 0)
    got = json.loads(rows.read_text()) if rows.exists() else {"rows": [], "rates": []}
    s.rows += [tuple(r) for r in got["rows"]]
    s.rates.update({(arch, batch): rate for arch, batch, rate in got["rates"]})
    if not finished:
        s.timeout(key, title, t0)
    elif child.proc.returncode:
        s.add(key, title, f"its process exited {child.proc.returncode} (output above)", False)


# ----------------------------------------------------------------------------------- table

PARTS = (("a", "correctness", part_a), ("b", "end to end", part_b), ("c", "throughput", part_c),
         ("d", "bank step and discovery", part_d), ("e", "fidelity", part_e))


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


class Tee:
    """Writes to the console and to the session's log in --out (only that folder and the output's
    last 12,000 characters come back from the device)."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.log.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes: the CPU smoke test of every part")
    ap.add_argument("--budget", type=float, default=None, help=f"seconds for all parts, counted from the start "
                    f"(default {MAX_BUDGET}: one {COMMAND_S} s device command; quick 90)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="folder of the table, the log, e's "
                    "metrics and c's profile (what comes back from the device)")
    ap.add_argument("--work", default=None, help="folder for generated data and runs (default: a temp folder)")
    ap.add_argument("--commit", default="", help="commit hash to record (default: git rev-parse HEAD)")
    ap.add_argument("--parts", default="abcde", help="which parts to run, e.g. e")
    ap.add_argument("--cifar", default=None, help="part e's CIFAR-10: the carry (a .tar.gz of a pack), a pack "
                    "(pack.json) or an ImageFolder tree (train/); default data/cifar10-pack.tar.gz, else "
                    "data/cifar10-pack; with --quick a generated tiny pack")
    ap.add_argument("--e-epochs", type=int, default=0, help="part e's epochs (default the config's 200)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)          # run this one part (in_child)
    ap.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    args.budget = args.budget or (90.0 if args.quick else float(MAX_BUDGET))
    args.work = args.work or tempfile.mkdtemp(prefix="gpu_session-")
    if args.device == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    s = Session(args)
    if args.child:
        dict((k, fn) for k, _, fn in PARTS)[args.child](s)
        return 0
    with open(s.out_file("-session.log"), "a") as log:
        sys.stdout, sys.stderr = Tee(sys.stdout, log), Tee(sys.stderr, log)
        try:
            return run_parts(s)
        finally:
            sys.stdout, sys.stderr = sys.stdout.stream, sys.stderr.stream


def run_parts(s: Session) -> int:
    args = s.args
    if args.budget > MAX_BUDGET:
        print(f"warning: --budget {args.budget:.0f} s cannot fit one {COMMAND_S} s device command with the "
              f"start-up, the writing and e's stop: use at most {MAX_BUDGET}", flush=True)
    print(f"device {device_name(s)}, torch {torch.__version__}, budget {args.budget:.0f} s, work {args.work}", flush=True)
    if "e" in args.parts:           # the carry refused in seconds, before any GPU work
        s.carry = fidelity_data(s)
        if isinstance(s.carry, str):
            print(f"error: part e's data: {s.carry}", file=sys.stderr, flush=True)
            return 3
    for key, title, fn in PARTS:
        s.part_end += (QUICK_BOXES if args.quick else BOXES)[key] * args.budget
        if key not in args.parts:
            s.add(key, title, "skipped: not in --parts", None)
            continue
        if s.left() < 3:
            s.add(key, title, f"skipped: {max(s.left(), 0):.0f} s left of the budget", None)
            continue
        t0 = time.time()
        try:
            if key in "cd":
                in_child(s, key, title)
            else:
                fn(s)
        except Exception as e:  # noqa: BLE001 - one part's failure must not cost the others' results
            s.add(key, title, f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", False)
            import traceback
            traceback.print_exc()
        if s.cuda:
            torch.cuda.empty_cache()       # what part d's discovery reserved is not held through e
        print(f"[{key}] {title}: {time.time() - t0:.0f} s", flush=True)
        s.write_table()
    s.write_table(final=True)
    return 1 if any(k == "FAIL" for *_, k in s.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
