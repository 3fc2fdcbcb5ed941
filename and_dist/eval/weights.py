"""Weights from elsewhere: a file's tensors matched to one of our architectures by name and shape.

Accepted: a plain state dict (torchvision's `resnet18`, `resnet50`, `alexnet`, or ours), a dict
wrapping one (`state_dict`, `model`, `net`, `teacher` ..., also nested), `module.` anywhere in the
key path (DataParallel on the whole net or on `features` only), and the released AND CIFAR
checkpoint `{'net', 'npc': {'memory'}, 'ANs_discovery', 'optimizer', 'epoch', 'round', 'acc'}`,
whose ResNet calls its projection `shortcut` and its embedding `linear` (ours: torchvision's
`downsample` and our `head`).

A last layer of `low_dim` outputs is kept as the embedding head; any other (torchvision's 1000-way
classifier) is dropped, and the model then returns its L2-normalised penultimate features.
Loading uses `weights_only=True`: a file is never executed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..platform.errors import UserError
from ..models import ARCHS, EmbeddingNet, build_model

WRAPPERS = ("state_dict", "model", "net", "teacher", "student", "model_state_dict", "network",
            "backbone", "encoder", "weights", "params")
HEADS = ("head", "fc", "linear", "classifier.6")   # the last layer's names: ours, ResNet, AND, AlexNet


@dataclass
class Loaded:
    model: EmbeddingNet
    arch: str
    what: str                        # one line: what was recognised
    bank: torch.Tensor | None = None  # released AND's memory bank (N x low_dim), if any
    has_head: bool = True


def load_file(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        lines = [l.strip() for l in str(e).splitlines() if l.strip()]
        why = next((l for l in lines if "Unsupported" in l), lines[0] if lines else type(e).__name__)
        why = why.removeprefix("WeightsUnpickler error: ").split(" was not an allowed")[0]
        raise UserError(f"{path}: torch.load(weights_only=True) cannot read it: not a torch file, or it "
                        f"pickles objects beyond tensors and plain containers (save a state_dict): {why[:160]}") from None


def _tensors(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def find_state_dict(obj, trail: str = "") -> tuple[dict | None, str]:
    """The first dict of tensors, looking through the usual wrapper keys; (state dict, its path)."""
    if _tensors(obj):
        return obj, trail or "the top level"
    if isinstance(obj, dict):
        for key in WRAPPERS:
            if isinstance(obj.get(key), dict):
                found, where = find_state_dict(obj[key], f"{trail}['{key}']")
                if found is not None:
                    return found, where
    return None, ""


def clean_key(key: str) -> str:
    """Our name for a key: no `module` segments (DataParallel), `shortcut` -> `downsample`, the
    trunk under `backbone.`, the last layer as `head.`."""
    parts = ["downsample" if p == "shortcut" else p for p in key.split(".") if p != "module"]
    name = ".".join(parts)
    if parts[0] == "backbone":
        return name
    for head in HEADS:
        if name.startswith(head + "."):
            return "head." + name[len(head) + 1:]
    return "backbone." + name


def _shapes(arch: str, low_dim: int, image_size: int) -> dict[str, torch.Size] | None:
    try:
        with torch.device("meta"):
            return {k: v.shape for k, v in build_model(arch, low_dim, image_size).state_dict().items()}
    except UserError:      # e.g. AlexNet on images too small for it
        return None


def _compare(src: dict, want: dict) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, wrong shape) among the trunk's keys; BN counters may be missing."""
    trunk = {k for k in want if k.startswith("backbone.")}
    have = {k for k in src if k.startswith("backbone.")}
    missing = sorted(k for k in trunk - have if not k.endswith("num_batches_tracked"))
    unexpected = sorted(have - trunk)
    shape = sorted(k for k in trunk & have if src[k].shape != want[k])
    return missing, unexpected, shape


def _short(keys: list[str], n: int = 3) -> str:
    names = [k.removeprefix("backbone.") for k in keys[:n]]
    return ", ".join(names) + (f" (+{len(keys) - n} more)" if len(keys) > n else "") if keys else "none"


def match(sd: dict, low_dim: int, image_size: int, archs=ARCHS) -> tuple[str, dict]:
    """(arch, our state dict) for the first architecture whose trunk the keys fill exactly."""
    src = {clean_key(k): v for k, v in sd.items()}
    best = None
    for arch in archs:
        want = _shapes(arch, low_dim, image_size)
        if want is None:
            continue
        missing, unexpected, shape = _compare(src, want)
        if not (missing or unexpected or shape):
            return arch, src
        score = len(missing) + len(unexpected) + len(shape)
        if best is None or score < best[0]:
            best = (score, arch, missing, unexpected, shape)
    if best is None:
        raise UserError(f"no architecture fits data.image_size={image_size}")
    _, arch, missing, unexpected, shape = best
    raise UserError(f"the weights match no architecture (tried {', '.join(archs)} at {image_size} px); "
                    f"closest {arch}: missing {_short(missing)}; unexpected {_short(unexpected)}; "
                    f"wrong shape {_short(shape)}")


def model_from_state(arch: str, src: dict, low_dim: int, image_size: int) -> tuple[EmbeddingNet, bool]:
    """Our model with `src` loaded (strict on the trunk); (model, whether it kept a head)."""
    model = build_model(arch, low_dim, image_size)
    trunk = {k.removeprefix("backbone."): v for k, v in src.items() if k.startswith("backbone.")}
    for k, v in model.backbone.state_dict().items():      # BN counters absent in older files
        trunk.setdefault(k, v)
    model.backbone.load_state_dict(trunk)
    w = src.get("head.weight")
    if w is not None and tuple(w.shape) == tuple(model.head.weight.shape):
        model.head.load_state_dict({"weight": w, "bias": src.get("head.bias", torch.zeros(len(w)))})
        return model.eval(), True
    model.head = nn.Identity()
    return model.eval(), False


def load_weights(path: Path, low_dim: int, image_size: int) -> Loaded:
    """Recognise and load a weights file; UserError (one line) when nothing fits."""
    obj = load_file(path)
    sd, where = find_state_dict(obj)
    if sd is None:
        top = ", ".join(map(str, list(obj)[:6])) if isinstance(obj, dict) else type(obj).__name__
        raise UserError(f"{path}: no state dict found (top level: {top}; looked under "
                        f"{', '.join(WRAPPERS)})")
    try:
        arch, src = match(sd, low_dim, image_size)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    model, has_head = model_from_state(arch, src, low_dim, image_size)
    bank, released = None, isinstance(obj, dict) and "net" in obj and isinstance(obj.get("npc"), dict)
    if released and isinstance(obj["npc"].get("memory"), torch.Tensor) and obj["npc"]["memory"].dim() == 2:
        bank = obj["npc"]["memory"].float()
    wrapped = any(p == "module" for k in sd for p in k.split("."))
    kind = "the released AND checkpoint" if released else f"a state dict at {where}"
    head = f"{low_dim}-d head kept" if has_head else (
        "its last layer dropped (not a %d-d embedding), kNN on penultimate features" % low_dim
        if "head.weight" in src else "no head, kNN on penultimate features")
    extra = ""
    if released:
        extra = "; " + ", ".join(f"{k} {obj[k]}" for k in ("epoch", "round", "acc") if isinstance(obj.get(k), (int, float)))
        extra += f"; memory bank {tuple(bank.shape)}" if bank is not None else "; no memory bank"
    what = (f"recognised {kind} as {arch}{' (DataParallel names)' if wrapped else ''}: "
            f"{sum(k.startswith('backbone.') for k in src)} trunk tensors, {head}{extra}")
    return Loaded(model, arch, what, bank, has_head)
