"""Fused per-channel FP8 quantization (one fp32 scale per output row) and its dequantization.

One program per (row tile, expert): a first sweep over the row's columns takes the amax, a second
quantizes with the row's scale (the tile is re-read, from L2 on a GPU). 2D and stacked 3D `[E, M, N]`
inputs share one launch; an FP8 input with its block scales is dequantized in registers on the way
(requantization, no bf16 copy). Formulas: fp8norm.kernels.numerics.fp8_channel.
Twins: fp8norm.reference.quant_fp8_channel / dequant_fp8_channel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .numerics import fp8_block as nx
from .numerics import fp8_channel as fc

from ._launch import LAUNCH_OPTIONS, as_3d, kernel
from ._device import (E4M3_MAX, amax_nan, cast_rne, ceil_mantissa, load_e4m3_as_f32, not_finite, tile_coords,
                        to_e4m3)
from .quant_nvfp4 import load_source

__all__ = ["quant_fp8_channel", "dequant_fp8_channel", "quant_fp8_channel_kernel", "dequant_fp8_channel_kernel"]

# 16 rows x 256 columns a step: 32 fp32 values a thread at 4 warps; 16-row programs keep a 7168-row
# weight at 448 programs (a GPU has ~132 SMs).
BLOCK_M = 16
BLOCK_N = 256
NUM_WARPS = 4


@kernel
def quant_fp8_channel_kernel(
    x_ptr, xs_ptr, q_ptr, s_ptr,
    M, N,
    stride_xe, stride_xm, stride_xn,
    stride_xse, stride_xsm,
    stride_qe, stride_qm,
    stride_se,
    amax_floor, sf_max,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SRC_BM: tl.constexpr, SRC_BN: tl.constexpr,
    SCALE_DROP_BITS: tl.constexpr,
    X_SCALED: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_e = tl.program_id(1).to(tl.int64)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows < M
    amax = tl.full((BLOCK_M,), 0.0, tl.float32)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        mask = rmask[:, None] & (cols[None, :] < N)
        x = load_source(x_ptr, xs_ptr, pid_e, rows, cols, mask, stride_xe, stride_xm, stride_xn, stride_xse,
                        stride_xsm, SRC_BM, SRC_BN, X_SCALED, INTERPRET)
        # NaN propagates through the running max: a NaN/Inf row gets a NaN scale, and the wrapper
        # raises naming it.
        amax = tl.maximum(amax, amax_nan(tl.abs(x), 1, INTERPRET), propagate_nan=tl.PropagateNan.ALL)
    bad = not_finite(amax)
    # div_rn: IEEE division, as torch does (plain `/` may lower to approximate div.full).
    sf = tl.math.div_rn(tl.maximum(amax, amax_floor), E4M3_MAX)
    if SCALE_DROP_BITS > 0:
        sf = ceil_mantissa(sf, SCALE_DROP_BITS)
    sf = tl.minimum(sf, sf_max)  # 448 * sf stays finite (a non-finite row's NaN scale is restored below)
    inv = tl.math.div_rn(1.0, sf)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        mask = rmask[:, None] & (cols[None, :] < N)
        x = load_source(x_ptr, xs_ptr, pid_e, rows, cols, mask, stride_xe, stride_xm, stride_xn, stride_xse,
                        stride_xsm, SRC_BM, SRC_BN, X_SCALED, INTERPRET)
        q = to_e4m3(x * inv[:, None], INTERPRET)
        tl.store(q_ptr + pid_e * stride_qe + rows[:, None] * stride_qm + cols[None, :], q, mask=mask)
    tl.store(s_ptr + pid_e * stride_se + rows, tl.where(bad, float("nan"), sf), mask=rmask)


@kernel
def dequant_fp8_channel_kernel(
    q_ptr, s_ptr, out_ptr,
    M, N,
    stride_qe, stride_qm, stride_qn,
    stride_oe, stride_om,
    stride_se,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid_e, _, _, rows, cols, mask = tile_coords(M, N, BLOCK_M, BLOCK_N)
    q = load_e4m3_as_f32(q_ptr + pid_e * stride_qe + rows[:, None] * stride_qm + cols[None, :] * stride_qn, mask,
                         INTERPRET)
    sf = tl.load(s_ptr + pid_e * stride_se + rows, mask=rows < M, other=0.0)
    out = cast_rne(q * sf[:, None], out_ptr.dtype.element_ty, INTERPRET)
    tl.store(out_ptr + pid_e * stride_oe + rows[:, None] * stride_om + cols[None, :], out, mask=mask)


def quant_fp8_channel(
    x: torch.Tensor,
    *,
    scale_fmt: str = "float",
    scale_dtype: torch.dtype = torch.float32,
    amax_floor: float = fc.AMAX_FLOOR,
    src_scale_inv: torch.Tensor | None = None,
    src_block_size=nx.DEFAULT_BLOCK_SIZE,
    num_warps: int = NUM_WARPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `x` ([M, N] or [E, M, N]) to e4m3 with one scale per row; see
    fp8norm.kernels.numerics.fp8_channel. Returns `(q, scale [..., M, 1])` with `x ~= q * scale`; a bfloat16
    scale_dtype rounds each scale up to a bfloat16 value first.
    An FP8 `x` comes with `src_scale_inv`, its block scales (blocks of `src_block_size`)."""
    drop_bits, sf_max, src_sf, (sbm, sbn) = fc.check_quant_args(x, scale_fmt, scale_dtype, amax_floor, src_scale_inv,
                                                          src_block_size)
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(fc.scale_shape(tuple(x.shape)), dtype=scale_dtype, device=x.device)
    x3, q3, s3 = as_3d(x), as_3d(q), as_3d(scale)
    n_exp, m, n = x3.shape
    if n_exp and m:
        xs3 = as_3d(src_sf) if src_sf is not None else s3  # placeholder when x is not FP8
        grid = (triton.cdiv(m, BLOCK_M), n_exp)
        quant_fp8_channel_kernel[grid](
            x3, xs3, q3, s3,
            m, n,
            x3.stride(0), x3.stride(1), x3.stride(2),
            xs3.stride(0), xs3.stride(1),
            q3.stride(0), q3.stride(1),
            s3.stride(0),
            float(amax_floor), sf_max,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, SRC_BM=sbm, SRC_BN=sbn,
            SCALE_DROP_BITS=drop_bits, X_SCALED=src_sf is not None,
            num_warps=num_warps,
            **LAUNCH_OPTIONS,
        )
    fc.raise_if_nonfinite_rows(scale)
    return q, scale


def dequant_fp8_channel(q: torch.Tensor, scale: torch.Tensor, *, out_dtype: torch.dtype = torch.bfloat16,
                        num_warps: int = NUM_WARPS) -> torch.Tensor:
    """`float(q) * scale[row]` for [M, N] or [E, M, N] with scale [..., M, 1], cast to out_dtype."""
    sf = fc.check_dequant_args(q, scale, out_dtype)
    out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    if q.numel():
        q3, o3, s3 = as_3d(q), as_3d(out), as_3d(sf)
        grid = (triton.cdiv(q3.shape[2], BLOCK_N), triton.cdiv(q3.shape[1], BLOCK_M), q3.shape[0])
        dequant_fp8_channel_kernel[grid](
            q3, s3, o3,
            q3.shape[1], q3.shape[2],
            q3.stride(0), q3.stride(1), q3.stride(2),
            o3.stride(0), o3.stride(1),
            s3.stride(0),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            num_warps=num_warps,
            **LAUNCH_OPTIONS,
        )
    return out
