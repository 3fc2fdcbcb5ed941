"""Which kernels, precisions, search backends and methods exist, and which combinations run:
the config's choices, light enough for config validation on a login node (no torch)."""
from __future__ import annotations

from ..platform.errors import UserError

BANK_KERNELS = ("auto", "exact", "attention")                  # the loss over the bank (bank.kernel)
DISCOVERY_KERNELS = ("auto", "exact", "attention", "fused")    # entropy + neighbours (discovery.kernel)
PRECISIONS = ("auto", "fp32", "bf16x3", "bf16")                # discovery's similarities
BACKENDS = ("torch", "faiss")                                  # discovery's nearest-neighbour search
METHODS = ("and", "instance")     # instance: the equal-budget baseline, no anchors


def check_choice(kernel: str, precision: str, backend: str, device_type: str = "") -> None:
    """Reject the combinations no kernel implements (one line each): in config validation, where
    the device may be unknown (`device_type` ""), and again once `auto` is resolved."""
    if kernel == "fused" and backend == "faiss":
        raise UserError("discovery.kernel=fused finds neighbours itself; use backend=torch, "
                        "or kernel=attention with faiss")
    if kernel == "fused" and device_type == "cpu":
        raise UserError("discovery.kernel=fused needs a CUDA device and Triton; use discovery.kernel=auto")
    maybe_fused = kernel == "fused" or (kernel == "auto" and backend != "faiss" and device_type != "cpu")
    if precision == "bf16x3" and not maybe_fused:
        shown = kernel if kernel != "auto" else ("attention" if backend == "faiss" else "exact")
        raise UserError(f"discovery.precision=bf16x3 is the fused kernel's; kernel {shown} takes fp32 or bf16")
