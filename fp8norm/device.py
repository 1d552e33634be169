"""Which torch device a command computes on (`--device`)."""

from __future__ import annotations

import torch

from .output import OutputError


def resolve_device(device: str, ctx=None) -> torch.device:
    """auto: CUDA when present (under torchrun the rank's LOCAL_RANK GPU), else the CPU."""
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", ctx.local_rank % torch.cuda.device_count()) if ctx else torch.device("cuda")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise OutputError(f"--device {device}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OutputError(f"--device {device}: CUDA is not available on this machine")
    return dev
