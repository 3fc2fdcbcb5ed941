"""The spread behind tests/test_learning.py's margin: the instance-loss drop of its run over seeds.

    python tools/learning_margin.py --seeds 0-14        # the 2026-12-07 figures: 0.31 to 0.90 nats

Each seed trains the test's run in this process and prints how much lower the instance loss of
every training image against the final bank is with the trained weights than with the initial
ones (batch statistics in both). Plant a bug in the trainer and run it again to see where it lands.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path
from tempfile import TemporaryDirectory

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_learning import RUN, instance_loss  # noqa: E402

import torch  # noqa: E402

from and_dist.config import load_config  # noqa: E402
from and_dist.platform import dist  # noqa: E402
from and_dist.run import rundir  # noqa: E402
from and_dist.run.stop import Stop  # noqa: E402
from and_dist.train import build_trainer  # noqa: E402


def drop(seed: int, folder: str) -> float:
    overrides = [o for o in RUN if not o.startswith("train.seed=")] + [f"train.seed={seed}", f"run_dir={folder}/{seed}"]
    cfg = load_config("demo", overrides)
    run, _ = rundir.choose(cfg.out_dir, cfg.name, cfg.run_dir, "")
    with Stop() as stop:
        trainer = build_trainer(cfg, dist.init("cpu"), run, None, stop)
        initial = copy.deepcopy(trainer.model)
        try:
            trainer.run()
        finally:
            trainer.log.close()
    images = torch.cat(list(trainer.data.eval_images("train", 0, len(trainer.data.train))))
    bank, t = trainer.bank.rows, cfg.bank.temperature
    return instance_loss(initial, images, bank, t) - instance_loss(trainer.model, images, bank, t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0-4", help="first-last (inclusive)")
    args = ap.parse_args()
    first, last = map(int, args.seeds.split("-"))
    with TemporaryDirectory() as folder:
        drops = [drop(s, folder) for s in range(first, last + 1)]
    for s, d in zip(range(first, last + 1), drops):
        print(f"seed {s}: {d:.3f} nats")
    print(f"min {min(drops):.3f} max {max(drops):.3f} mean {statistics.mean(drops):.3f}"
          + (f" sd {statistics.stdev(drops):.3f}" if len(drops) > 1 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
