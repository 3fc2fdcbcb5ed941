"""What a discovery found, handed back: `neighbourhoods/round<r>.npz` in the run directory, so a
user can search, deduplicate or cluster their own images with it (np.load, no and_dist needed).

Arrays, row i = sample i = bank row i:
  files            its image file (absent for sources without files: demo, official CIFAR/SVHN)
  anchor           bool, an anchor this round
  neighbours       int64 (N, k), its nearest other rows, nearest first
  entropy          float64, of its softmax over the bank (low: confident)
  mutual_rate, view_agreement, round_stability
                   float64, the label-free flags (label_free.py): 1 / 0, or a share of
                   neighbours; NaN where not measured (view_agreement off its sample,
                   round_stability at the first discovery)
  bank_age         int64, steps since its bank row was last updated (-1: never, still random)
  round, step      when
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..platform import files as io_files


def write(path: Path, round_: int, step: int, curriculum, free, path_of, n: int, ages=None) -> Path:
    nb = curriculum.nbhd
    arrays = {"round": np.int64(round_), "step": np.int64(step), "anchor": curriculum.anchor.numpy(),
              "neighbours": nb.neighbours.numpy(), "entropy": nb.entropy.numpy()}
    if free is not None:
        arrays.update({name: v.numpy() for name, v in free.per_sample.items()})
    if ages is not None:
        arrays["bank_age"] = ages.numpy()
    if path_of is not None:
        arrays["files"] = np.array([path_of(i) for i in range(n)])
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    io_files.write_bytes(path, buf.getvalue())
    return path
