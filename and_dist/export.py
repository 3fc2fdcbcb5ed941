"""Export a run's backbone for use elsewhere: `python -m and_dist.export RUN --to torchvision OUT.pth`;
or the embedding of every training image with its file: `--to embeddings OUT.npz` (the run's memory
bank, or `--features recompute`: the model on each image with the test transform).

OUT.pth is a plain state dict in torchvision's names: `torchvision.models.<arch>()` loads it with
`strict=False` and reports only its classifier (`fc.*`, AlexNet's `classifier.6.*`) as missing.
The CIFAR ResNet-18 (3x3 stem, no max-pool) has no torchvision builder of its own: it loads into
`resnet18()` once `conv1` is a 3x3/stride-1 conv and `maxpool` an Identity (the JSON says so).
The 128-d embedding head is not part of torchvision's model and is left out; OUT.json beside the
file records the architecture, the dimensions, the input normalisation and size, and the run's kNN.
Exit 0, 2 for a user error (one line), 128 + N when signal N stopped it (neither file is left).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .platform import files
from .platform.errors import EXIT_USER_ERROR, UserError
from .platform.log import progress_bar
from .run.stop import exits_on_stop

TORCHVISION = {  # our arch -> (torchvision builder, its classifier keys, how to load)
    "resnet18": ("resnet18", ["fc.weight", "fc.bias"], "m = torchvision.models.resnet18()"),
    "resnet50": ("resnet50", ["fc.weight", "fc.bias"], "m = torchvision.models.resnet50()"),
    "alexnet": ("alexnet", ["classifier.6.weight", "classifier.6.bias"], "m = torchvision.models.alexnet()"),
    "resnet18_cifar": ("resnet18", ["fc.weight", "fc.bias"],
                       "m = torchvision.models.resnet18(); m.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False); "
                       "m.maxpool = torch.nn.Identity()"),
}


def torchvision_state(model) -> dict[str, torch.Tensor]:
    """The backbone's tensors under torchvision's names (ours less the `backbone.` prefix)."""
    return {k: v.detach().cpu().clone() for k, v in model.backbone.state_dict().items()}


def normalisation(cfg) -> tuple[tuple, tuple]:
    """The mean/std the run's eval images were normalised with (in-memory: CIFAR's; streamed: ImageNet's)."""
    if cfg.data.loader == "cached":
        from .data.augment import CIFAR_MEAN, CIFAR_STD
        return CIFAR_MEAN, CIFAR_STD
    from .data.stream import IMAGENET_MEAN, IMAGENET_STD
    return IMAGENET_MEAN, IMAGENET_STD


def export(source: str, out: Path) -> dict:
    from .eval.pretrained import load_model
    from .evaluate import resolve_trained, run_of
    ckpt, weights, _ = resolve_trained(source)
    if ckpt is None:
        raise UserError(f"{weights} is a weights file; export takes a run (directory, checkpoint or run name)")
    model, cfg, ckpt = load_model(ckpt)
    arch = cfg.model.arch
    if arch not in TORCHVISION:
        raise UserError(f"model.arch={arch} has no torchvision counterpart; export --to torchvision "
                        f"takes {', '.join(TORCHVISION)}")
    name, missing, how = TORCHVISION[arch]
    if out.suffix != ".pth":
        raise UserError(f"{out}: the output is a .pth file (its JSON goes beside it)")
    try:
        summary = json.loads((run_of(ckpt) / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    mean, std = normalisation(cfg)
    info = {
        "arch": arch, "torchvision": name, "load": f"{how}; m.load_state_dict(torch.load('{out.name}'), strict=False)",
        "missing_when_loaded": missing, "feature_dim": model.feat_dim, "embedding_dim": cfg.model.low_dim,
        "embedding_head": "not exported (the features are the backbone's pooled output)",
        "mean": list(mean), "std": list(std), "input_size": cfg.data.image_size,
        "knn": {"top1": summary.get("final_knn_top1"), "top5": summary.get("final_knn_top5"),
                "k": cfg.eval.knn_k, "sigma": cfg.eval.knn_sigma, "features": f"the run's {cfg.model.low_dim}-d embedding"},
        "checkpoint": str(ckpt),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        files.torch_save(torchvision_state(model), out)
        files.write_text(out.with_suffix(".json"), json.dumps(info, indent=2))
    except BaseException:                 # stopped during or between the two writes: neither is left
        out.unlink(missing_ok=True)
        out.with_suffix(".json").unlink(missing_ok=True)
        raise
    return info


def export_embeddings(source: str, out: Path, features: str = "bank") -> dict:
    """OUT.npz: `embeddings` (N, D) float32, unit length, row i = training sample i, `files` (N,)
    its image file where the source has files; for search, deduplication or clustering."""
    import numpy as np
    from .data import build_data
    from .eval.features import extract
    from .eval.pretrained import load_model
    from .run.contents import RunState
    from .evaluate import resolve_trained
    from .platform.dist import init
    ckpt, weights, _ = resolve_trained(source)
    if ckpt is None:
        raise UserError(f"{weights} is a weights file; export takes a run (directory, checkpoint or run name)")
    if out.suffix != ".npz":
        raise UserError(f"{out}: embeddings are written as a .npz file")
    model, cfg, ckpt = load_model(ckpt)
    cfg.data.loader = "torch" if cfg.data.loader == "dali" else cfg.data.loader      # no GPU needed here
    data = build_data(cfg, init("cpu"), None, print, False)
    n = len(data.train)
    if features == "bank":
        rows = RunState(ckpt).bank_slice(n, 0, n)
        if rows is None:
            raise UserError(f"{ckpt} holds no memory bank; use --features recompute")
    else:
        bar = progress_bar(n, "train features", sys.stderr.isatty(), print, unit="img")   # all of ImageNet: minutes
        rows = torch.nn.functional.normalize(extract(model, data.eval_images("train", 0, n), progress=bar.update), dim=1)
        bar.close()
    arrays = {"embeddings": rows.float().numpy()}
    if data.train.path is not None:
        arrays["files"] = np.array([data.train.path(i) for i in range(n)])
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:   # np.savez would add .npz to a name without it
        np.savez_compressed(f, **arrays)
    return {"checkpoint": str(ckpt), "rows": n, "dim": rows.shape[1], "files": "files" in arrays,
            "features": features}


@exits_on_stop("run the same command again")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m and_dist.export", description=(
        "Write a run's backbone as a torchvision state dict (OUT.pth) and its description (OUT.json)."))
    parser.add_argument("run", help="a run directory, a checkpoint directory or a run-name directory")
    parser.add_argument("--to", required=True, choices=("torchvision", "embeddings"),
                        help="torchvision: the backbone (OUT.pth); embeddings: every training image's embedding "
                        "with its file (OUT.npz)")
    parser.add_argument("--features", default="bank", choices=("bank", "recompute"),
                        help="embeddings: the memory bank's rows, or recomputed with the test transform")
    parser.add_argument("out", help="OUT.pth or OUT.npz")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.to == "embeddings":
            info = export_embeddings(args.run, Path(args.out).expanduser(), args.features)
            print(f"exported {info['rows']} embeddings ({info['dim']}-d, {info['features']}) of {info['checkpoint']} "
                  f"to {args.out}" + (" with their files" if info["files"] else " (this source has no files)"))
            return 0
        info = export(args.run, Path(args.out).expanduser())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"exported {info['checkpoint']} as torchvision {info['torchvision']} to {args.out} "
          f"(+ {Path(args.out).with_suffix('.json').name}); load with: {info['load']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
