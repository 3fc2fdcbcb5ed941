"""Batch norm with statistics over the global batch, on any backend (gloo on CPU included).

Why: with per-rank statistics a BN model computes a different function for every world size, so a
run on W ranks cannot match one process. torch.nn.SyncBatchNorm does this on GPUs only; this
version all-reduces (sum, sum of squares, count) in the forward and (sum dy, sum dy*xhat) in the
backward, which is all the exact gradient needs.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..platform import dist


class _GlobalBatchNorm(torch.autograd.Function):
    """Statistics in float32 at least (in bf16 a count like 134848 rounds to 135168); the output
    in the input's dtype (autograd casts the gradient back likewise)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        c = x.shape[1]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))   # bf16 -> float32; float64 stays
        count = xf.new_full((1,), x.numel() // c)     # filled on the device: no host copy (a sync)
        stats = dist.all_reduce(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]), "sum")
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c: 2 * c] / n - mean * mean).clamp_min(0)
        invstd = torch.rsqrt(var + eps)
        xhat = (xf - mean.view(shape)) * invstd.view(shape)
        ctx.save_for_backward(xhat, weight, invstd, n)
        ctx.dims, ctx.shape = dims, shape
        running_var = var * n / (n - 1).clamp_min(1)          # unbiased, as BatchNorm tracks it
        ctx.mark_non_differentiable(mean, running_var)
        y = xhat if weight is None else xhat * weight.view(shape) + bias.view(shape)
        return y.to(x.dtype), mean, running_var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        xhat, weight, invstd, n = ctx.saved_tensors
        dims, shape = ctx.dims, ctx.shape
        dbias, dweight = dy.sum(dims), (dy * xhat).sum(dims)   # this rank's share, as for any parameter
        c = len(dbias)
        total = dist.all_reduce(torch.cat([dbias, dweight]), "sum")
        mean_dy, mean_dy_xhat = (total[:c] / n).view(shape), (total[c:] / n).view(shape)
        scale = invstd if weight is None else weight * invstd
        dx = scale.view(shape) * (dy - mean_dy - xhat * mean_dy_xhat)
        if weight is None:                                     # affine=False: no parameters
            return dx, None, None, None
        return dx, dweight, dbias, None


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Drop-in for BatchNorm1d/2d whose training statistics span all ranks."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x):
        if not (self.training and dist.active()):
            return super().forward(x)
        y, mean, var = _GlobalBatchNorm.apply(x, self.weight, self.bias, self.eps)
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean), alpha=m)
            self.running_var.mul_(1 - m).add_(var.to(self.running_var), alpha=m)
        return y


def convert_global_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer by GlobalBatchNorm, keeping parameters and running stats."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        new.load_state_dict(module.state_dict())
        return new.to(module.weight.device if module.affine else module.running_mean.device)
    for name, child in module.named_children():
        setattr(module, name, convert_global_bn(child))
    return module
