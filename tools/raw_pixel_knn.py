"""Weighted kNN on raw pixels: the baseline a learned representation has to beat.

    python tools/raw_pixel_knn.py --config demo [key=value ...]

Uses the same data set, test transform (per-channel normalisation) and kNN (k, sigma from the
config) as the trainer; each image is its flattened, L2-normalised pixel vector.
"""
import sys

import torch
import torch.nn.functional as F

from and_dist.data.augment import TestTransform
from and_dist.config import config_or_exit
from and_dist.data import load_datasets
from and_dist.data.cached import channel_stats
from and_dist.eval.knn import knn_accuracy


def main(argv=None) -> None:
    cfg = config_or_exit(argv)
    d = cfg.data
    train, test = load_datasets(d.source, d.root, d.image_size, d.cache_dir or None, False, d.workers,
                                d.demo_train, d.demo_test, d.demo_seed)
    transform = TestTransform(d.image_size, *channel_stats(train.images))

    def pixels(images):
        return torch.cat([F.normalize(transform(images[a:a + 1024]).flatten(1), dim=1)
                          for a in range(0, len(images), 1024)])

    top1, top5 = knn_accuracy(pixels(test.images), test.labels, pixels(train.images), train.labels,
                              len(train.classes), cfg.eval.knn_k, cfg.eval.knn_sigma)
    print(f"raw-pixel kNN (k={cfg.eval.knn_k}, sigma={cfg.eval.knn_sigma}) on {d.source}: "
          f"top-1 {top1:.2f} top-5 {top5:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
