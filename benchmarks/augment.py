"""Colour jitter: the compiled masked form (what CUDA runs by default) against the eager masked
form (CUDA with data.compile_augment=false) and the eager indexed form (what CPU runs).

All three give the same images (tests/test_data.py). Per (image size, batch): milliseconds per
batch after warm-up (compile time reported apart), and the ratios against eager masked, from
one run. On CUDA the eager masked form is ~380 small kernels, so it is host-bound at small
images; compiled it is a few fused ones.

Run:  .venv/bin/python benchmarks/augment.py                                  # CPU
      .venv/bin/python benchmarks/augment.py --device cuda --cases 32:128 32:512 224:256
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from common import REPO, measure

sys.path.insert(0, str(REPO))


def main() -> None:
    from and_dist.data.augment import jitter_indexed, jitter_masked

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cases", nargs="+", default=["32:128", "96:64"], help="image_size:batch")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    dev, cuda = torch.device(args.device), args.device == "cuda"
    name = torch.cuda.get_device_name(dev) if cuda else f"cpu x{torch.get_num_threads()}"
    print(f"device {name}; ms per batch (compile time apart); ratio = eager masked / this")
    head = f"{'px':>4} {'batch':>6} {'masked':>9} {'compiled':>9} {'ratio':>6} {'indexed':>9} {'ratio':>6} {'compile s':>9}"
    print(head + "\n" + "-" * len(head), flush=True)
    for case in args.cases:
        size, batch = map(int, case.split(":"))
        g = torch.Generator().manual_seed(0)
        x = torch.rand(batch, 3, size, size, generator=g).to(dev)
        f = torch.empty(batch, 4).uniform_(0.6, 1.4, generator=g)
        f[:, 3] = torch.empty(batch).uniform_(-0.4, 0.4, generator=g)
        f = f.view(batch, 4, 1, 1, 1).to(dev)
        order = torch.rand(batch, 4, generator=g).argsort(1)          # on the CPU: the indexed form's
        on_dev = order.to(dev)                                           # the masked forms take it on the device
        fused = torch.compile(jitter_masked, dynamic=False)
        t0 = time.perf_counter()
        fused(x, f, on_dev)
        if cuda:
            torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        masked = measure(lambda: jitter_masked(x, f, on_dev), args.steps)
        compiled = measure(lambda: fused(x, f, on_dev), args.steps)
        indexed = measure(lambda: jitter_indexed(x.clone(), f, order), args.steps)
        print(f"{size:>4} {batch:>6} {masked * 1e3:>9.2f} {compiled * 1e3:>9.2f} {masked / compiled:>6.1f} "
              f"{indexed * 1e3:>9.2f} {masked / indexed:>6.1f} {compile_s:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
