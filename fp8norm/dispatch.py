"""Pick the Triton kernel or its torch twin for each call.

CUDA tensors go to Triton, CPU tensors to the twin. FP8NORM_BACKEND=triton|torch forces one; Triton on
CPU tensors then runs under the Triton interpreter (chosen per launch, no environment variable; slow:
meant for tests).
"""

from __future__ import annotations

import os

import torch

from .kernels.numerics import fp8_block as nx
from .kernels.numerics import fp8_channel as fc
from .kernels.numerics import int4
from .kernels.numerics import mx
from . import reference

BACKENDS = ("triton", "torch")
ENV_BACKEND = "FP8NORM_BACKEND"


def backend_for(t: torch.Tensor) -> str:
    forced = os.environ.get(ENV_BACKEND, "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{ENV_BACKEND}={forced!r}: expected one of {BACKENDS}")
        return forced
    return "triton" if t.is_cuda else "torch"


def _impl(t: torch.Tensor):
    if backend_for(t) == "torch":
        return reference
    import fp8norm.kernels  # lazy: importing triton costs a second the torch path does not need

    return fp8norm.kernels


def quant_fp8_block(
    x: torch.Tensor,
    *,
    block_size=nx.DEFAULT_BLOCK_SIZE,
    scale_fmt: str = "float",
    scale_dtype: torch.dtype = torch.float32,
    amax_floor: float = nx.DEFAULT_AMAX_FLOOR,
    scale_inv: torch.Tensor | None = None,
    x_scale_inv: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-FP8 quantize `x` ([M, N] or [E, M, N]) on the backend chosen for its device.

    Returns `(q, scale_inv)`: q float8_e4m3fn shaped like x, scale_inv `[..., ceil(M/bm), ceil(N/bn)]`.
    An FP8 `x` with its `x_scale_inv` is requantized (e.g. to ue8m0 scales) in one pass.
    """
    return _impl(x).quant_fp8_block(
        x, block_size=block_size, scale_fmt=scale_fmt, scale_dtype=scale_dtype,
        amax_floor=amax_floor, scale_inv=scale_inv, x_scale_inv=x_scale_inv)


def dequant_fp8_block(
    q: torch.Tensor,
    scale_inv: torch.Tensor,
    *,
    block_size=nx.DEFAULT_BLOCK_SIZE,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """`q * scale_inv` per tile, on the backend chosen for q's device."""
    return _impl(q).dequant_fp8_block(q, scale_inv, block_size=block_size, out_dtype=out_dtype)


def quant_nvfp4(x: torch.Tensor, *, global_amax=None, src_scale_inv=None, src_block_size=nx.DEFAULT_BLOCK_SIZE,
                group_size: int = 16):
    """NVFP4 (E2M1 + per-16 E4M3 scales + fp32 global scale) on the backend chosen for x's device.

    Returns `(packed uint8 [..., M, N/2], weight_scale e4m3 [..., M, N/16], weight_scale_2)`; an FP8 x
    with `src_scale_inv` is dequantized and requantized in one pass.
    """
    return _impl(x).quant_nvfp4(x, global_amax=global_amax, src_scale_inv=src_scale_inv,
                                src_block_size=src_block_size, group_size=group_size)


def dequant_nvfp4(packed, weight_scale, weight_scale_2, *, out_dtype: torch.dtype = torch.bfloat16):
    return _impl(packed).dequant_nvfp4(packed, weight_scale, weight_scale_2, out_dtype=out_dtype)


def nvfp4_amax(x: torch.Tensor, *, src_scale_inv=None, src_block_size=nx.DEFAULT_BLOCK_SIZE) -> torch.Tensor:
    """The amax quant_nvfp4 would use: fp32, 0-dim for 2D, [E] for 3D (for joint global scales)."""
    return _impl(x).nvfp4_amax(x, src_scale_inv=src_scale_inv, src_block_size=src_block_size)


def quant_fp8_channel(x: torch.Tensor, *, scale_fmt: str = "float", scale_dtype: torch.dtype = torch.float32,
                      amax_floor: float = fc.AMAX_FLOOR, src_scale_inv=None,
                      src_block_size=nx.DEFAULT_BLOCK_SIZE):
    """Per-channel FP8 (one fp32 scale per row) on the backend chosen for x's device: `(q, scale [..., M, 1])`.
    An FP8 x with its block scales `src_scale_inv` is requantized in one pass."""
    return _impl(x).quant_fp8_channel(x, scale_fmt=scale_fmt, scale_dtype=scale_dtype, amax_floor=amax_floor,
                                      src_scale_inv=src_scale_inv, src_block_size=src_block_size)


def dequant_fp8_channel(q: torch.Tensor, scale: torch.Tensor, *, out_dtype: torch.dtype = torch.bfloat16):
    return _impl(q).dequant_fp8_channel(q, scale, out_dtype=out_dtype)


def quant_mx(x: torch.Tensor, *, fmt: str = "mxfp8", rule: str = mx.DEFAULT_RULE, src_scale_inv=None,
             src_block_size=nx.DEFAULT_BLOCK_SIZE):
    """MXFP8/MXFP4 (blocks of 32, E8M0 scales) on the backend chosen for x's device: `(elements, scale codes)`."""
    return _impl(x).quant_mx(x, fmt=fmt, rule=rule, src_scale_inv=src_scale_inv, src_block_size=src_block_size)


def dequant_mx(stored: torch.Tensor, scale: torch.Tensor, *, fmt: str = "mxfp8",
               out_dtype: torch.dtype = torch.bfloat16):
    return _impl(stored).dequant_mx(stored, scale, fmt=fmt, out_dtype=out_dtype)


def quant_int4(x: torch.Tensor, *, group_size: int = int4.GROUP_SIZE, rule: str = int4.DEFAULT_RULE):
    """Symmetric int4, one scale per `group_size` along a row (W4A16), on the backend chosen for x's device:
    `(packed int32 [M, N/8], scale [M, N/group_size] in x's dtype)`."""
    return _impl(x).quant_int4(x, group_size=group_size, rule=rule)


def dequant_int4(packed: torch.Tensor, scale: torch.Tensor, *, group_size: int = int4.GROUP_SIZE,
                 out_dtype: torch.dtype = torch.bfloat16):
    return _impl(packed).dequant_int4(packed, scale, group_size=group_size, out_dtype=out_dtype)
