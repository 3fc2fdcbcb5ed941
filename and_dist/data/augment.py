"""Batched augmentation on uint8 image tensors (CPU or GPU), matching the paper's torchvision pipeline.

Why: per-sample PIL transforms are the bottleneck of small-image training. Here a whole batch is
cropped/resized/flipped by one `grid_sample` call and colour-jittered with tensor ops.

All random parameters are drawn on the CPU from the caller's generator for the *global* batch
(`total` samples) and each call applies rows `offset .. offset+B`. Every rank of a distributed job
draws the same parameters and applies its own slice, so the augmented global batch does not depend
on the number of ranks.
"""
from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
_LUMA = (0.299, 0.587, 0.114)
_CROP_TRIES = 10


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [0, 1]."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 (B, H, W, 3) images, got {images.dtype} {tuple(images.shape)}")
    return images.permute(0, 3, 1, 2).float().div_(255)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> GPU without a host sync (pinned staging, non-blocking copy); as is elsewhere."""
    if device.type != "cuda" or t.is_cuda:
        return t
    return t.pin_memory().to(device, non_blocking=True)


@functools.lru_cache(maxsize=16)
def _stats(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalisation constants, copied to a device once (not at every batch)."""
    return tuple(torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1).to(device) for v in (mean, std))


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m, s = _stats(tuple(mean), tuple(std), x.device)
    return (x - m.to(x.dtype)) / s.to(x.dtype)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luminance (B, 1, H, W) of float RGB (B, 3, H, W)."""
    return _LUMA[0] * x[:, 0:1] + _LUMA[1] * x[:, 1:2] + _LUMA[2] * x[:, 2:3]


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """Batched RGB -> HSV, all channels in [0, 1] (float (B, 3, H, W))."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    s = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    d = torch.where(delta > 0, delta, torch.ones_like(delta))     # grey pixels: hue 0, avoid 0/0
    h = torch.where(maxc == r, (g - b) / d,
                    torch.where(maxc == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    h = torch.where(delta > 0, torch.remainder(h / 6.0, 1.0), torch.zeros_like(h))
    return torch.stack([h, s, maxc], 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Batched HSV -> RGB, using the closed form c_n = v - v*s*clamp(min(k, 4-k), 0, 1), k = (n + 6h) mod 6."""
    h, s, v = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    n = torch.arange(5, 0, -2, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)   # 5, 3, 1; made on the device
    k = torch.remainder(n + 6.0 * h, 6.0)
    return v - v * s * torch.minimum(k, 4.0 - k).clamp(0, 1)


def _brightness(x, f):
    return (x * f).clamp_(0, 1)


def _contrast(x, f):
    mean = grayscale(x).mean((1, 2, 3), keepdim=True)
    return (f * x + (1 - f) * mean).clamp_(0, 1)


def _saturation(x, f):
    return (f * x + (1 - f) * grayscale(x)).clamp_(0, 1)


def _hue(x, f):
    hsv = rgb_to_hsv(x)
    hsv = torch.cat([torch.remainder(hsv[:, 0:1] + f, 1.0), hsv[:, 1:]], 1)
    return hsv_to_rgb(hsv).clamp_(0, 1)


_COLOUR_OPS = (_brightness, _contrast, _saturation, _hue)


def jitter_indexed(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Colour ops in each sample's own order, applied to the samples that take an op at a step
    (CPU: the least work; the index sets are computed on the CPU)."""
    for step in range(4):
        for op in range(4):
            idx = (order[:, step] == op).nonzero()[:, 0]
            if len(idx):
                x[idx] = _COLOUR_OPS[op](x[idx], factors[idx, op])
    return x


def jitter_masked(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The same, every op on the whole batch and selected by mask: more arithmetic but no
    data-dependent shapes, so the GPU never waits on the host."""
    order = order.view(len(x), 4, 1, 1, 1)                      # on x's device (the caller moves it)
    for step in range(4):
        out = x
        for op in range(4):
            out = torch.where(order[:, step] == op, _COLOUR_OPS[op](x, factors[:, op]), out)
        x = out
    return x


class Compiled:
    """`fn` through torch.compile: on CUDA the masked jitter is ~380 small kernels in eager mode
    (host-bound, ~8 ms a batch of 128 on an H100, and ~4 passes over memory per op at 224 px);
    compiled, a handful of fused ones. From the first failure on (no compiler, an unsupported
    op) it runs eager, said once."""

    def __init__(self, fn):
        self.fn, self.compiled, self.failed = fn, None, False

    def __call__(self, *args):
        if not self.failed:
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(self.fn, dynamic=False)
                return self.compiled(*args)
            except Exception as e:  # noqa: BLE001 - eager is always correct, only slower
                self.failed = True
                warnings.warn(f"compiling {self.fn.__name__} failed ({type(e).__name__}: {e}); "
                              "running it eagerly", stacklevel=2)
        return self.fn(*args)


jitter_compiled = Compiled(jitter_masked)


def pick_jitter(device: torch.device, compiled: bool):
    """CPU: indexed subsets (least work); CUDA: masked (no host sync), compiled unless told not."""
    if device.type != "cuda":
        return jitter_indexed
    return jitter_compiled if compiled else jitter_masked


class Augment:
    """The paper's random augmentation as one draw for a whole global batch: RandomResizedCrop
    boxes (each from its own image size), ColorJitter factors and order, RandomGrayscale and
    RandomHorizontalFlip; applied by TrainAugment (in-memory images) and stream.StreamAugment
    (crops decoded from files)."""

    def __init__(self, size: int, crop_scale=(0.2, 1.0), jitter: float = 0.4, grayscale_p: float = 0.2,
                 flip: bool = True, mean=CIFAR_MEAN, std=CIFAR_STD, ratio=(3 / 4, 4 / 3), compiled: bool = True):
        self.size, self.crop_scale, self.ratio = size, tuple(crop_scale), tuple(ratio)
        self.jitter, self.grayscale_p, self.flip = float(jitter), float(grayscale_p), flip
        self.mean, self.std, self.compiled = tuple(mean), tuple(std), compiled

    def draw_boxes(self, hw: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Crop boxes (total, 4: top, left, height, width; float64) and colour draws (factors,
        order, gray, flip) of `total` images of sizes `hw` (total, 2), drawn on the CPU
        (`generator` must be a CPU one) in a fixed order: they depend only on the generator
        state and the image sizes."""
        g, total = generator, len(hw)
        height, width = hw[:, :1].double(), hw[:, 1:].double()
        # RandomResizedCrop: 10 candidate (area, log-ratio) per sample, the first that fits wins.
        area = height * width * torch.empty(total, _CROP_TRIES, dtype=torch.float64).uniform_(
            *self.crop_scale, generator=g)
        log_r = torch.empty(total, _CROP_TRIES, dtype=torch.float64).uniform_(
            math.log(self.ratio[0]), math.log(self.ratio[1]), generator=g)
        pos = torch.rand(total, 2, dtype=torch.float64, generator=g)
        j = self.jitter
        factors = torch.empty(total, 4, dtype=torch.float64).uniform_(max(0.0, 1 - j), 1 + j, generator=g)
        factors[:, 3] = torch.empty(total, dtype=torch.float64).uniform_(-min(j, 0.5), min(j, 0.5), generator=g)
        order = torch.rand(total, 4, generator=g).argsort(1)            # per-sample order of the colour ops
        gray = torch.rand(total, generator=g) < self.grayscale_p
        flip = (torch.rand(total, generator=g) < 0.5) & self.flip

        w = torch.round(torch.sqrt(area * torch.exp(log_r)))
        h = torch.round(torch.sqrt(area / torch.exp(log_r)))
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = ok.to(torch.int8).argmax(1, keepdim=True)              # first fitting try (0 if none)
        w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
        height, width = height[:, 0], width[:, 0]
        # No try fits: torchvision's fallback, the centred whole image with its ratio clamped.
        ratio = width / height
        fw = torch.where(ratio > self.ratio[1], torch.round(height * self.ratio[1]), width)
        fh = torch.where(ratio < self.ratio[0], torch.round(width / self.ratio[0]), height)
        none = ~ok.any(1)
        w, h = torch.where(none, fw, w), torch.where(none, fh, h)
        top = torch.where(none, (height - h) // 2, torch.floor(pos[:, 0] * (height - h + 1)))
        left = torch.where(none, (width - w) // 2, torch.floor(pos[:, 1] * (width - w + 1)))
        return torch.stack([top, left, h, w], 1), dict(factors=factors, order=order, gray=gray, flip=flip)

    def colour(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        """ColorJitter then RandomGrayscale on float (b, 3, S, S) images, with this batch's draws
        (still on the CPU: moved without a device sync)."""
        dev, b = x.device, len(x)
        if self.jitter > 0:
            factors = to_device(p["factors"].float(), dev).view(b, 4, 1, 1, 1)
            x = pick_jitter(dev, self.compiled)(x, factors, to_device(p["order"], dev))
        if p["gray"].any():
            x = torch.where(to_device(p["gray"], dev).view(b, 1, 1, 1), grayscale(x).expand(-1, 3, -1, -1), x)
        return x

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, self.mean, self.std)


class TrainAugment(Augment):
    """RandomResizedCrop -> ColorJitter -> RandomGrayscale -> RandomHorizontalFlip -> Normalize on
    a batch of equally sized uint8 images; crop, resize and flip are one grid_sample."""

    def draw(self, total: int, height: int, width: int, generator: torch.Generator) -> dict:
        """All random parameters of `total` samples of one image size."""
        hw = torch.tensor([[height, width]]).expand(total, 2)
        boxes, colour = self.draw_boxes(hw, generator)
        top, left, h, w = boxes.unbind(1)
        return dict(top=top, left=left, h=h, w=w, **colour)

    def __call__(self, images: torch.Tensor, generator: torch.Generator, offset: int = 0,
                 total: int | None = None) -> torch.Tensor:
        b, height, width, _ = images.shape
        total = b if total is None else total
        if offset < 0 or offset + b > total:
            raise ValueError(f"rows {offset}..{offset + b} outside the {total} drawn parameters")
        p = {k: v[offset:offset + b] for k, v in self.draw(total, height, width, generator).items()}
        dev = images.device

        # Crop + resize + flip as one affine map from output to input normalised coordinates
        # (align_corners=False: the crop box's pixel edges map onto the output's edges).
        sx = p["w"] / width * torch.where(p["flip"], -1.0, 1.0).double()
        tx = (2 * p["left"] + p["w"]) / width - 1
        sy = p["h"] / height
        ty = (2 * p["top"] + p["h"]) / height - 1
        zero = torch.zeros_like(sx)
        theta = torch.stack([torch.stack([sx, zero, tx], 1), torch.stack([zero, sy, ty], 1)], 1)
        grid = F.affine_grid(to_device(theta.float(), dev), [b, 3, self.size, self.size], align_corners=False)
        x = F.grid_sample(to_float(images), grid, mode="bilinear", padding_mode="border", align_corners=False)
        return self.normalize(self.colour(x, p))


def resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of the shorter side to `size` (antialiased when shrinking), then centre
    crop to size x size; float (B, C, H, W). The one resize of the project (decode caches, eval)."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[:, :, top:top + size, left:left + size]


def resize_uint8(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """`resize_center_crop` of a uint8 (N, H, W, 3) tensor; a no-op at the right size."""
    n, h, w, _ = images.shape
    if (h, w) == (size, size):
        return images.contiguous()
    out = torch.empty((n, size, size, 3), dtype=torch.uint8)
    for i in range(0, n, chunk):
        x = resize_center_crop(images[i:i + chunk].permute(0, 3, 1, 2).float(), size)
        out[i:i + chunk] = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return out


class TestTransform:
    """Deterministic eval transform: to float, resize (shorter side + centre crop) if needed, normalise."""

    def __init__(self, size: int, mean=CIFAR_MEAN, std=CIFAR_STD):
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(resize_center_crop(to_float(images), self.size), self.mean, self.std)
