"""Which backend runs an op for tensors on a device: ``resolve_backend``, shared by every op.

``auto`` takes Triton on CUDA and the torch path elsewhere. ``triton`` on a CPU device is allowed
only under Triton's interpreter (``TRITON_INTERPRET=1``, read where the kernels' launches read
it); anything else is an error, never a silent fallback.
"""
from __future__ import annotations

import torch

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton is a hard dependency; guards broken installs
        return False
    return True


def interpreting() -> bool:
    """Whether Triton launches may take CPU tensors (Triton's interpreter): the kernels' own switch."""
    from ptune_rt.kernels._triton_utils import interpreting as kernels_interpreting

    return kernels_interpreting()


def resolve_backend(requested: str, device: torch.device) -> tuple[str, str]:
    """Pick the backend for tensors on ``device``: returns ``(backend, reason)``."""
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    device = torch.device(device)
    if requested == "torch":
        return "torch", "backend='torch' requested"
    if requested == "auto":
        if device.type == "cuda" and triton_available():
            return "triton", "CUDA tensors"
        return "torch", f"{device.type} tensors (Triton kernels run on CUDA; ask for backend='triton' "\
            "under TRITON_INTERPRET=1 to interpret them on CPU)"
    # requested == "triton"
    if not triton_available():
        raise RuntimeError("backend='triton' requested but triton cannot be imported")
    if device.type == "cuda":
        return "triton", "backend='triton' requested, CUDA tensors"
    if interpreting():
        return "triton", "backend='triton' requested, CPU tensors under TRITON_INTERPRET=1 (interpreter)"
    raise RuntimeError(
        f"backend='triton' needs CUDA tensors, got {device.type}; set TRITON_INTERPRET=1 to run the "
        "kernels in Triton's CPU interpreter, or use backend='torch'")
