"""Trainer throughput against the model's own speed: how much the AND step (data, loss, bank) costs.

What is measured, per (arch, image size, batch), one process on --device with synthetic uint8
images held by CachedData (on the GPU when CUDA):

  trainer  Trainer.step on CachedData batches: batched augmentation on the device, forward under
           train.precision (bf16 autocast on CUDA by default, channels_last for conv nets), the AND
           loss over a bank of N rows (train.kernel: attention on CUDA), backward, SGD, bank update.
  model    forward + backward + SGD step of the same network on one fixed, already augmented batch
           of the same size, precision and layout (loss = sum of the features): the ceiling.

Reported: images/s of both and trainer/model, from one run; and host syncs per steady-state
step (CUDA; torch's sync debug mode counts them).

Run:  .venv/bin/python benchmarks/train_throughput.py --device cuda
      .venv/bin/python benchmarks/train_throughput.py --device cpu --cases resnet18_cifar:32:32 --steps 3
"""
from __future__ import annotations

import argparse
import sys
import warnings

import torch

from common import REPO, measure

sys.path.insert(0, str(REPO))

CASES = ["resnet18_cifar:32:128", "resnet18_cifar:32:512", "alexnet_bn:224:256"]


def synthetic(n: int, size: int, seed: int):
    from and_dist.data.base import ImageSet
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g),
                    torch.randint(0, 10, (n,), generator=g), [str(c) for c in range(10)])


def build(arch: str, size: int, batch: int, *, n: int, device: str, precision_: str, compile_: bool,
          root: str = "", workers: int = 8):
    """The trainer's parts for one case: CachedData over synthetic images, or with `root` (an
    ImageFolder tree) the torch streaming loader over its JPEGs."""
    from and_dist.platform import dist, precision
    from and_dist.config import Config
    from and_dist.data import load_streamed
    from and_dist.data.cached import CachedData
    from and_dist.method.bank import ShardedBank
    from and_dist.method.curriculum import Curriculum
    from and_dist.models import build_model
    from and_dist.training.state import Progress
    from and_dist.training.trainer import Trainer

    cfg = Config()
    cfg.model.arch, cfg.data.image_size, cfg.train.batch_size = arch, size, batch
    cfg.train.precision, cfg.train.compile = precision_, compile_
    env = dist.init(device)
    if root:
        cfg.data.source, cfg.data.loader, cfg.data.root, cfg.data.workers = "imagefolder", "torch", root, workers
        data = load_streamed(cfg, env, None, log=lambda *a: None, progress=False)
        n = len(data.train)
    else:
        data = CachedData(synthetic(n, size, 0), synthetic(64, size, 1), cfg, env)
    model = build_model(arch, cfg.model.low_dim, size).to(env.device)
    last = precision.set_layout(model, env.device)
    forward = precision.wrap(model, env.device, precision_, last, compile_)
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, nesterov=True, weight_decay=5e-4)
    bank = ShardedBank(n, cfg.model.low_dim, device=env.device)
    trainer = Trainer(cfg=cfg, env=env, run_dir=None, data=data, model=model, forward=forward, opt=opt, bank=bank,
                      curriculum=Curriculum(0.25), progress=Progress(), log=None, report=None, stop=None)
    return trainer, data, forward, opt, env


def syncs_per_step(fn, steps: int = 5) -> tuple[float, str]:
    """Host syncs per call, counted by torch.cuda's sync debug mode (warn), and where they are."""
    import collections
    import os
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    where = collections.Counter(f"{os.path.basename(w.filename)}:{w.lineno}" for w in syncs)
    return len(syncs) / steps, ", ".join(f"{k} x{v / steps:g}" for k, v in where.most_common(8))


def endless(data, epoch: int):
    """The batches of `epoch`, over and over."""
    while True:
        yield from data.batches(0, epoch)


def run_case(arch: str, size: int, batch: int, *, n: int, device: str, precision_: str = "auto",
             compile_: bool = False, prefetch: int = 2, steps: int = 30, syncs: bool = False,
             root: str = "", warmup: int = 3, workers: int = 8) -> dict:
    """One case measured: images/s of the trainer (prefetch `prefetch` and 0), of the model's own
    forward + backward + SGD, of the step on a fixed batch and of the data alone; the trainer's
    input-stall split (step_timer) and, with `syncs`, host syncs per step."""
    from and_dist.run.step_timer import StepTimer
    n = n if size <= 96 else max(n // 10, 4 * batch)
    trainer, data, forward, opt, env = build(arch, size, batch, n=n, device=device, precision_=precision_,
                                             compile_=compile_, root=root, workers=workers)
    timer = StepTimer(env.device)
    stream = iter(())

    def train_step():
        nonlocal stream
        batch_ = next(stream, None)
        if batch_ is None:
            stream = iter(timer.batches(data.batches(0, 0)))
            batch_ = next(stream)
        return trainer.step(batch_)

    def train_steps(prefetch_: int) -> float:
        nonlocal stream
        data.prefetch, stream = prefetch_, iter(())
        return measure(train_step, steps, warmup)

    fixed = next(iter(data.batches(0, 1))).images

    def model_step():
        out = forward(fixed)
        opt.zero_grad(set_to_none=True)
        out.sum().backward()
        opt.step()

    one = next(iter(data.batches(0, 2)))
    t_model = measure(model_step, steps, warmup)
    t_serial = train_steps(0)                                            # batches built in the step
    timer.split()
    t_train = train_steps(prefetch)
    split = timer.split()                                                # warm-up steps included
    t_fixed = measure(lambda: trainer.step(one), steps, warmup)   # the step without the data
    data.prefetch, alone = 0, endless(data, 3)
    t_data = measure(lambda: next(alone), steps, warmup)
    count, where = syncs_per_step(train_step) if syncs else (float("nan"), "")
    return {"arch": arch, "size": size, "batch": batch, "compile": compile_, "prefetch": prefetch,
            "trainer": batch / t_train, "model": batch / t_model, "ratio": t_model / t_train,
            "serial": batch / t_serial, "fixed": batch / t_fixed, "data": batch / t_data,
            "wait_share": split["data_wait_share"], "wait_ms": split["data_wait_ms"],
            "step_ms": split["step_ms"], "syncs": count, "where": where}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cases", nargs="+", default=CASES, help="arch:image_size:batch")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--n", type=int, default=50000, help="data set size (bank rows); 224 px uses n / 10")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--prefetch", type=int, default=2, help="data.prefetch for the trainer column")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    from and_dist.platform import precision
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}, precision "
          f"{precision.resolve_precision(args.precision, torch.device(args.device))}, compile {args.compile}, "
          f"{args.steps} timed steps", flush=True)
    head = (f"{'arch':<15} {'px':>4} {'batch':>6} {'trainer img/s':>14} {'model img/s':>12} "
            f"{'trainer/model':>13} {'syncs/step':>10}")
    print(head + "\n" + "-" * len(head), flush=True)
    for case in args.cases:
        arch, size, batch = case.split(":")
        r = run_case(arch, int(size), int(batch), n=args.n, device=args.device, precision_=args.precision,
                     compile_=args.compile, prefetch=args.prefetch, steps=args.steps, syncs=cuda)
        print(f"{arch:<15} {size:>4} {batch:>6} {r['trainer']:>14.0f} {r['model']:>12.0f} "
              f"{r['ratio']:>13.3f} {r['syncs']:>10.1f}", flush=True)
        print(f"    prefetch {args.prefetch} against 0: {r['trainer'] / r['serial']:.2f}x ({r['serial']:.0f} img/s "
              f"without); step on a fixed batch {r['fixed']:.0f} img/s, data alone {r['data']:.0f} img/s; "
              f"data wait {100 * r['wait_share']:.0f}% ({r['wait_ms']:.2f} of {r['step_ms']:.2f} ms/step)"
              + (f"; syncs at {r['where']}" if r['where'] else ""), flush=True)
    print("trainer: Trainer.step on CachedData batches (augmentation, forward, AND loss, backward, SGD, bank "
          "update); model: forward + backward + SGD on one fixed augmented batch, same precision and layout.")


if __name__ == "__main__":
    main()
