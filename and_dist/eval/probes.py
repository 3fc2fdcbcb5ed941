"""Linear probes on frozen layers: where to tap the backbone, how to pool each tap to about 9k
numbers, the heads, their progress (a checkpoint owner) and their top-1/top-5 on the test split.

Taps are forward hooks on module paths under the backbone (AlexNet `conv1`..`conv5`, ResNet
`layer1`..`layer4`, any `features.N`), so one tool probes every architecture. A hook pools its
layer's output as soon as it is produced, and the forward stops after the last tapped layer: one
backbone pass feeds every head and nothing past the deepest tap is computed.

Pooling: AlexNet at 224 px uses the fixed pools of the conv-layer protocol (Zhang et al. 2016,
used by Wu et al. 2018 and AND; kernels as in the public DeepCluster evaluation): conv1
AvgPool(6, 6, pad 3) -> 96x10x10 = 9600, conv2 AvgPool(4, 4) -> 256x6x6 = 9216, conv3/conv4
AvgPool(3, 3, pad 1) -> 384x5x5 = 9600, conv5 AvgPool(2, 2) -> 256x6x6 = 9216. Any other layer or
size is adaptively average-pooled to s x s with s = round(sqrt(9216 / channels)) (at most the
layer's own size), e.g. ResNet-18 at 224 px: layer1 64x12x12, layer2 128x8x8, layer3 256x6x6,
layer4 512x4x4.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..platform import dist
from ..platform.errors import UserError
from ..models.global_bn import GlobalBatchNorm

TARGET_DIM = 9216
ALEXNET_POOLS = {  # layer -> (side at 224 px, kernel, stride, padding)
    "conv1": (55, 6, 6, 3), "conv2": (27, 4, 4, 0), "conv3": (13, 3, 3, 1),
    "conv4": (13, 3, 3, 1), "conv5": (13, 2, 2, 0),
}


@dataclass
class Tap:
    name: str
    shape: tuple[int, int, int]   # (channels, height, width) of the layer's output
    pool: nn.Module
    dim: int                      # numbers per image after pooling


def backbone_of(model: nn.Module) -> nn.Module:
    return getattr(model, "backbone", model)


def _pool_for(name: str, channels: int, side: int, alexnet: bool) -> nn.Module:
    fixed = ALEXNET_POOLS.get(name) if alexnet else None
    if fixed is not None and fixed[0] == side:
        _, k, s, p = fixed
        return nn.AvgPool2d(k, stride=s, padding=p)
    out = max(1, min(side, round(math.sqrt(TARGET_DIM / channels))))
    return nn.AdaptiveAvgPool2d(out)


def _module(backbone: nn.Module, name: str) -> nn.Module:
    try:
        return backbone.get_submodule(name)
    except AttributeError:
        names = ", ".join(n for n, _ in backbone.named_children())
        raise UserError(f"probe.layers: the backbone has no module '{name}'; its top-level modules are "
                        f"{names} (nested ones as dotted paths, e.g. layer1.0)") from None


class Taps:
    """Forward hooks that pool each tapped layer's output; `taps(x)` returns the pooled features
    (b, dim) in `layers` order. A dry run on one image of `image_size` fixes every shape first."""

    def __init__(self, model: nn.Module, layers: list[str], image_size: int):
        if not layers:
            raise UserError("probe.layers is empty; name at least one layer (e.g. [conv1, conv5])")
        if len(set(layers)) != len(layers):
            raise UserError(f"probe.layers names a layer twice: {layers}")
        from ..models.alexnet import AlexNetBN
        self.backbone, self.layers = backbone_of(model), list(layers)
        self.out: dict[str, torch.Tensor] = {}
        self.running = False
        self.pools: dict[str, nn.Module] = {}
        self.hooks = [_module(self.backbone, n).register_forward_hook(self._hook(n)) for n in layers]
        p = next(model.parameters())
        shapes = {n: tuple(f.shape[1:]) for n, f in self._run(torch.zeros(1, 3, image_size, image_size,
                                                                           dtype=p.dtype, device=p.device)).items()}
        unused = [n for n in layers if n not in shapes]
        if unused:
            raise UserError(f"probe.layers: {', '.join(unused)} never run in the backbone's forward")
        alexnet = isinstance(self.backbone, AlexNetBN)
        self.taps = []
        for n in layers:
            if len(shapes[n]) != 3:
                raise UserError(f"probe.layers: '{n}' outputs {shapes[n]} per image, not a (C, H, W) map")
            c, h, w = shapes[n]
            pool = _pool_for(n, c, min(h, w), alexnet)
            dim = pool(torch.zeros(1, c, h, w)).numel()
            self.taps.append(Tap(n, (c, h, w), pool, dim))
            self.pools[n] = pool

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if not self.running:      # a forward of the model outside the probes
                return
            pool = self.pools.get(name)
            self.out[name] = output if pool is None else torch.flatten(pool(output), 1)
            if len(self.out) == len(self.layers):
                raise _Enough
        return hook

    @torch.no_grad()
    def _run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.out, self.running = {}, True
        try:
            self.backbone(x)
        except _Enough:
            pass
        finally:
            self.running = False
        out, self.out = self.out, {}
        return out

    def __call__(self, x: torch.Tensor, autocast: bool = False) -> list[torch.Tensor]:
        """Pooled float32 features of each tapped layer; `autocast`: the backbone in bfloat16."""
        with torch.autocast(x.device.type, torch.bfloat16, enabled=autocast):
            out = self._run(x)
        return [out[n].float() for n in self.layers]

    @property
    def dims(self) -> dict[str, int]:
        return {t.name: t.dim for t in self.taps}

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []


class _Enough(Exception):
    """Raised by the last tap's hook: the rest of the backbone is not needed."""


@dataclass
class ProbeProgress:
    """The next probe step to run, the loss of the epoch in progress, and each epoch's results."""
    epoch: int = 0
    step: int = 0
    global_step: int = 0
    loss: list = field(default_factory=list)      # per head, summed over this epoch's finished steps
    history: list = field(default_factory=list)
    seconds: float = 0.0
    source: dict = field(default_factory=dict)    # what is probed, and how (must match to resume)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, s: dict) -> None:
        for k, v in s.items():
            setattr(self, k, v)


class ProbeHeads(nn.Module):
    """One head per tapped layer: BatchNorm without affine (optional), then a linear classifier.
    The heads share nothing, so summing their losses trains each on its own gradient. The BN's
    statistics span the global batch, so W ranks train the heads one process would."""

    def __init__(self, dims: list[int], classes: int, batch_norm: bool = True):
        super().__init__()

        def head(d: int) -> nn.Module:
            linear = nn.Linear(d, classes)
            return nn.Sequential(GlobalBatchNorm(d, affine=False), linear) if batch_norm else linear

        self.heads = nn.ModuleList(head(d) for d in dims)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [h(f) for h, f in zip(self.heads, feats)]


def ten_crops(x: torch.Tensor) -> list[torch.Tensor]:
    """The four corners and the centre of `x` upscaled by 256/224, and their mirror images.
    Why upscale: every loader hands out centre crops already; this approximates TenCrop(224) of
    the 256-px image (the classic protocol) from the 224-px centre crop."""
    s = x.shape[-1]
    big = F.interpolate(x, size=round(s * 256 / 224), mode="bilinear", align_corners=False)
    r = big.shape[-1]
    corners = [(0, 0), (0, r - s), (r - s, 0), (r - s, r - s), ((r - s) // 2, (r - s) // 2)]
    crops = [big[..., t:t + s, l:l + s] for t, l in corners]
    return crops + [c.flip(-1) for c in crops]


@torch.no_grad()
def score_heads(heads: nn.Module, taps: Taps, data, env, ten_crop: bool = False, autocast: bool = False,
             bar=None) -> list[tuple[float, float]]:
    """(top-1, top-5) % per head on the test split: each rank scores its shard, counts are summed.
    With `ten_crop` the softmax is averaged over ten crops per image. `heads` is the plain module,
    never its DDP wrapper: ranks hold different numbers of test batches, and a DDP forward is
    collective."""
    heads.eval()
    lo, hi = dist.shard_range(len(data.test), env.world, env.rank)
    labels = data.test.labels[lo:hi]
    classes = len(data.train.classes)
    k = min(5, classes)
    correct = torch.zeros(len(taps.layers), 2, dtype=torch.float64)
    dtype = next(taps.backbone.parameters()).dtype
    at = lo
    for x in data.eval_images("test", lo, hi):
        x = x.to(env.device, dtype)
        truth = labels[at - lo: at - lo + len(x)].to(env.device)[:, None]
        votes = None
        for crop in (ten_crops(x) if ten_crop else [x]):
            logits = heads(taps(crop, autocast))
            probs = [lg.float().softmax(1) for lg in logits]
            votes = probs if votes is None else [v + p for v, p in zip(votes, probs)]
        for i, v in enumerate(votes):
            pred = v.topk(k, dim=1).indices
            correct[i, 0] += (pred[:, :1] == truth).sum().item()
            correct[i, 1] += (pred == truth).any(1).sum().item()
        at += len(x)
        if bar is not None:
            bar.update(len(x))
    correct = dist.all_reduce(correct.to(env.device)).cpu()
    n = max(len(data.test), 1)
    return [(100.0 * a / n, 100.0 * b / n) for a, b in correct.tolist()]
