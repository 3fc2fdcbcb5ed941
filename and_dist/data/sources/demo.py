"""Embedded synthetic dataset: 10 procedurally drawn shapes with heavy nuisance factors.

Why: the trainer needs a default dataset that needs no files or network, is identical on every
machine, and on which raw pixels are a poor representation (colours, position, scale and clutter
are independent of the class) while the class stays obvious from the shape, so that unsupervised
feature learning has something to show.
"""
from __future__ import annotations

import numpy as np
import torch

from ..base import ImageSet

CLASSES = ["disc", "square", "triangle", "plus", "ring",
           "hbars", "vbars", "xcross", "lshape", "star"]

_SS = 2          # supersampling: masks are drawn hard at 2x resolution, then averaged (anti-aliasing)
_CHUNK = 500     # images rendered at once (bounds memory)
_N_BLOBS = 2     # clutter discs per image
_N_LINES = 0     # clutter line segments per image (lines look like parts of the bar classes)
_PALETTE = np.array([[0.9, 0.15, 0.1], [0.1, 0.6, 0.2], [0.15, 0.3, 0.9], [0.95, 0.85, 0.2],
                     [0.6, 0.2, 0.7], [0.1, 0.75, 0.8], [0.95, 0.95, 0.95], [0.1, 0.1, 0.1]])


def _shape_mask(label: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of shape `label` in object coordinates (u right, v down, object radius ~1)."""
    au, av, rho = np.abs(u), np.abs(v), np.sqrt(u * u + v * v)
    box = (au < 0.9) & (av < 0.9)
    if label == 0:                                   # disc
        return rho < 0.95
    if label == 1:                                   # square
        return np.maximum(au, av) < 0.8
    if label == 2:                                   # triangle, apex up
        return (v < 0.7) & (au < (v + 1.0) * 0.55)
    if label == 3:                                   # plus
        return ((au < 0.28) & (av < 0.95)) | ((av < 0.28) & (au < 0.95))
    if label == 4:                                   # ring
        return (rho < 0.95) & (rho > 0.55)
    if label == 5:                                   # three horizontal bars
        return box & (np.mod(v + 0.9, 0.72) < 0.36)
    if label == 6:                                   # three vertical bars
        return box & (np.mod(u + 0.9, 0.72) < 0.36)
    if label == 7:                                   # diagonal cross (X)
        return (np.minimum(np.abs(u - v), np.abs(u + v)) < 0.3) & (np.maximum(au, av) < 0.8)
    if label == 8:                                   # L: left stem + bottom foot
        return box & ((u < -0.35) | (v > 0.4))
    if label == 9:                                   # five-pointed star
        u, v = u.astype(np.float64), v.astype(np.float64)   # float64: libm last-bit differences can't flip pixels
        spike = np.abs(np.mod(np.arctan2(u, -v) * 5.0 / (2 * np.pi) + 0.5, 1.0) - 0.5) * 2.0  # 0 at a tip
        return np.sqrt(u * u + v * v) < 1.0 - 0.6 * spike
    raise ValueError(label)


def _draw_params(rng: np.random.RandomState, n_train: int, n_test: int, size: int) -> dict:
    """All random factors, drawn up front so rendering in chunks stays deterministic.

    Labels are balanced within each split (round robin, then shuffled)."""
    n, p = n_train + n_test, {}
    p["label"] = np.concatenate([rng.permutation(np.arange(m) % len(CLASSES)) for m in (n_train, n_test)])
    p["r"] = rng.uniform(0.22, 0.45, n) * size                    # object radius in pixels
    p["cx"] = rng.uniform(p["r"], size - p["r"])
    p["cy"] = rng.uniform(p["r"], size - p["r"])
    p["angle"] = np.deg2rad(rng.uniform(-15, 15, n))
    # Colours come from a small palette: they vary across images independently of the class, but
    # are shared by many images of every class, so they cannot tell one image from all others
    # (instance discrimination then has to look at shape, position and scale).
    bg = rng.randint(0, len(_PALETTE), n)
    fg = (bg + rng.randint(1, len(_PALETTE), n)) % len(_PALETTE)   # never the background's colour
    shade = rng.uniform(0.8, 1.0, (n, 1))
    p["bg0"] = _PALETTE[bg] * shade
    p["bg1"] = _PALETTE[bg] * shade * 0.75                          # gentle gradient
    p["bg_dir"] = rng.uniform(0, 2 * np.pi, n)
    p["fg"] = _PALETTE[fg]
    p["blob_xy"] = rng.uniform(0, size, (n, _N_BLOBS, 2))
    p["blob_r"] = rng.uniform(1.0, 3.0, (n, _N_BLOBS)) * size / 32
    p["blob_rgb"] = _PALETTE[rng.randint(0, len(_PALETTE), (n, _N_BLOBS))]
    p["line_a"] = rng.uniform(0, size, (n, _N_LINES, 2))
    p["line_b"] = rng.uniform(0, size, (n, _N_LINES, 2))
    p["line_w"] = rng.uniform(0.4, 0.8, (n, _N_LINES)) * size / 32  # half width
    p["line_rgb"] = _PALETTE[rng.randint(0, len(_PALETTE), (n, _N_LINES))]
    p["noise_seed"] = rng.randint(0, 2**31 - 1)
    return p


def _render(p: dict, sl: slice, size: int) -> np.ndarray:
    """Render images `sl`: gradient background, clutter (blobs, lines) behind, the shape on top.

    Masks are computed at _SS x resolution into a map of which layer is on top per subpixel, so the
    colours are composed once with a single gather; the smooth background is evaluated at 1x."""
    s = size * _SS
    coords = (np.arange(s, dtype=np.float32) + 0.5) / _SS          # pixel-unit centres
    y, x = coords[None, :, None], coords[None, None, :]              # (1, s, 1), (1, 1, s)
    sc = lambda a: np.asarray(a, dtype=np.float32)[:, None, None]     # (n,) -> (n, 1, 1)
    n = sl.stop - sl.start
    top = np.zeros((n, s, s), dtype=np.uint8)                        # 0 = background
    layer = 1
    for k in range(_N_BLOBS):
        bx, by = p["blob_xy"][sl, k, 0], p["blob_xy"][sl, k, 1]
        top[(x - sc(bx)) ** 2 + (y - sc(by)) ** 2 < sc(p["blob_r"][sl, k]) ** 2] = layer
        layer += 1
    for k in range(_N_LINES):
        a, ab = p["line_a"][sl, k], p["line_b"][sl, k] - p["line_a"][sl, k]
        px, py = x - sc(a[:, 0]), y - sc(a[:, 1])
        t = np.clip((px * sc(ab[:, 0]) + py * sc(ab[:, 1])) / sc((ab ** 2).sum(1) + 1e-6), 0, 1)
        top[(px - t * sc(ab[:, 0])) ** 2 + (py - t * sc(ab[:, 1])) ** 2 < sc(p["line_w"][sl, k]) ** 2] = layer
        layer += 1
    dx, dy = x - sc(p["cx"][sl]), y - sc(p["cy"][sl])
    cos, sin, r = sc(np.cos(p["angle"][sl])), sc(np.sin(p["angle"][sl])), sc(p["r"][sl])
    u, v = (cos * dx + sin * dy) / r, (-sin * dx + cos * dy) / r
    labels = p["label"][sl]
    for c in np.unique(labels):
        idx = np.nonzero(labels == c)[0]
        top[idx] = np.where(_shape_mask(int(c), u[idx], v[idx]), layer, top[idx])

    colours = np.concatenate([p["blob_rgb"][sl], p["line_rgb"][sl], p["fg"][sl, None]], 1).astype(np.float32)
    colours = np.concatenate([np.zeros((n, 1, 3), np.float32), colours], 1)       # slot 0: background, added below
    img = colours[np.arange(n)[:, None, None], top]                                  # (n, s, s, 3)
    pool = lambda a: sum(a[:, i::_SS, j::_SS] for i in range(_SS) for j in range(_SS)) / _SS ** 2  # anti-alias
    img, bg_cover = pool(img), pool((top == 0).astype(np.float32))[..., None]

    y, x = y[:, ::_SS] + (0.5 - 0.5 / _SS), x[:, :, ::_SS] + (0.5 - 0.5 / _SS)      # final pixel centres
    d = np.stack([np.cos(p["bg_dir"][sl]), np.sin(p["bg_dir"][sl])], 1)
    t = np.clip((sc(d[:, 0]) * (x - size / 2) + sc(d[:, 1]) * (y - size / 2)) / size + 0.5, 0, 1)[..., None]
    bg0, bg1 = (p[k][sl, None, None, :].astype(np.float32) for k in ("bg0", "bg1"))
    img = img + bg_cover * (bg0 + (bg1 - bg0) * t)                                 # linear gradient background
    noise = np.random.RandomState(p["noise_seed"] + sl.start).normal(0, 0.04, img.shape).astype(np.float32)
    return np.clip(np.rint((img + noise) * 255), 0, 255).astype(np.uint8)


def make_demo(n_train: int = 5000, n_test: int = 1000, seed: int = 0, size: int = 32) -> tuple[ImageSet, ImageSet]:
    """Build the (train, test) demo sets; identical for the same arguments on every machine."""
    n = n_train + n_test
    p = _draw_params(np.random.RandomState(seed), n_train, n_test, size)
    images = np.concatenate([_render(p, slice(i, min(i + _CHUNK, n)), size) for i in range(0, n, _CHUNK)])
    images = torch.from_numpy(np.ascontiguousarray(images))
    labels = torch.from_numpy(p["label"].astype(np.int64))

    def part(sl: slice) -> ImageSet:
        return ImageSet(images[sl].contiguous(), labels[sl].contiguous(), list(CLASSES), [])
    return part(slice(0, n_train)), part(slice(n_train, n))
