"""Which kernels, precisions, search backends and methods exist, and which combinations run:
the config's choices, light enough for config validation on a login node (no torch)."""
from __future__ import annotations

from ..platform.errors import UserError

BANK_KERNELS = ("auto", "exact", "attention")                  # the loss over the bank (bank.kernel)
DISCOVERY_KERNELS = ("auto", "exact", "attention", "fused")    # entropy + neighbours (discovery.kernel)
PRECISIONS = ("auto", "fp32", "bf16x3", "bf16")                # discovery's similarities
BACKENDS = ("torch", "faiss")                                  # discovery's nearest-neighbour search
METHODS = ("and", "instance")     # instance: the equal-budget baseline, no anchors


def resolve_kernel(kernel: str, precision: str, backend: str, fused_runs: bool | None = None) -> tuple[str, str]:
    """(kernel, precision) with `auto` resolved, or one line for a combination no kernel implements.

    fused_runs: whether the fused kernel runs on the device (CUDA with Triton); None where that is
    not known yet (config validation without a device), where `auto` stays unresolved."""
    if kernel == "fused" and backend == "faiss":
        raise UserError("discovery.kernel=fused finds neighbours itself; use backend=torch, "
                        "or kernel=attention with faiss")
    if kernel == "fused" and fused_runs is False:
        raise UserError("discovery.kernel=fused needs a CUDA device and Triton; use discovery.kernel=auto")
    unfused = "attention" if backend == "faiss" else "exact"
    if kernel == "auto" and fused_runs is not None:
        kernel = "fused" if fused_runs and backend != "faiss" else unfused
    maybe_fused = kernel == "fused" or (kernel == "auto" and backend != "faiss")
    if precision == "bf16x3" and not maybe_fused:
        raise UserError(f"discovery.precision=bf16x3 is the fused kernel's; kernel "
                        f"{unfused if kernel == 'auto' else kernel} takes fp32 or bf16")
    if precision == "auto" and kernel != "auto":
        precision = "bf16x3" if kernel == "fused" else "fp32"
    return kernel, precision
