"""Fused block FP8 quantization: per-tile amax -> scale -> (ue8m0/bf16 round up) -> saturating e4m3.

One program per (expert, row tile, column tile); 2D and stacked 3D `[E, M, N]` inputs share a
single launch. Twin: fp8norm.reference.quant_fp8_block.
"""

from __future__ import annotations

import torch
import triton.language as tl

from .numerics import fp8_block as nx
from .numerics.args import check_quant_args, raise_if_nonfinite_tiles

from ._launch import LAUNCH_OPTIONS, as_3d, kernel
from ._device import E4M3_MAX, amax_nan, ceil_mantissa, load_e4m3_as_f32, not_finite, tile_coords, to_e4m3

# Scale output encodings (the stored dtype of scale_inv).
# 4 warps: 128 elements a thread (16 independent 128-bit loads from bf16), ~166 registers, no spills,
# 3 resident blocks per SM on sm_90, fewest instructions per element (6.1 from bf16 on sm_90; 8
# warps: 7.1 and 2 blocks, 16 warps: 8.8). `python tools/aot_compile.py --sweep-warps 2,4,8,16`.
NUM_WARPS = 4

SCALE_OUT_F32, SCALE_OUT_BF16, SCALE_OUT_E8M0 = 0, 1, 2
_SCALE_OUT = {torch.float32: SCALE_OUT_F32, torch.bfloat16: SCALE_OUT_BF16,
              torch.float8_e8m0fnu: SCALE_OUT_E8M0}


@kernel
def quant_fp8_block_kernel(
    x_ptr, q_ptr, s_in_ptr, s_out_ptr, xs_ptr,
    M, N,
    stride_xe, stride_xm, stride_xn,
    stride_qe, stride_qm,
    stride_se, stride_sm,
    amax_floor,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SCALE_DROP_BITS: tl.constexpr,
    SCALE_OUT: tl.constexpr,
    GIVEN_SCALE: tl.constexpr,
    X_SCALED: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # Ragged edges are masked; masked lanes read 0, which never raises the amax.
    pid_e, pid_m, pid_n, rows, cols, mask = tile_coords(M, N, BLOCK_M, BLOCK_N)
    x_offs = pid_e * stride_xe + rows[:, None] * stride_xm + cols[None, :] * stride_xn
    s_off = pid_e * stride_se + pid_m * stride_sm + pid_n
    if X_SCALED:
        # FP8 input with its own block scales: dequantize in registers (requantization, one pass)
        x = load_e4m3_as_f32(x_ptr + x_offs, mask, INTERPRET) * tl.load(xs_ptr + s_off)
    else:
        x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)

    # One reduction gives the scale and, through NaN propagation, whether the tile is finite.
    amax = amax_nan(tl.abs(x), None, INTERPRET)
    nonfinite = not_finite(amax)
    if GIVEN_SCALE:
        sf = tl.load(s_in_ptr + s_off)
    else:
        # div_rn: IEEE division, as torch does (plain `/` may lower to approximate div.full).
        sf = tl.math.div_rn(tl.maximum(amax, amax_floor), E4M3_MAX)
        if SCALE_DROP_BITS > 0:
            sf = ceil_mantissa(sf, SCALE_DROP_BITS)
    inv = tl.math.div_rn(1.0, sf)
    q = to_e4m3(x * inv, INTERPRET)
    tl.store(q_ptr + pid_e * stride_qe + rows[:, None] * stride_qm + cols[None, :], q, mask=mask)

    # A NaN scale marks a tile holding NaN/Inf; the wrapper raises naming it.
    sf = tl.where(nonfinite, float("nan"), sf)
    if SCALE_OUT == 2:
        # e8m0 shares fp32's exponent field and bias; a NaN scale becomes 0xFF, e8m0's NaN.
        tl.store(s_out_ptr + s_off, ((sf.to(tl.int32, bitcast=True) >> 23) & 0xFF).to(tl.uint8))
    else:
        tl.store(s_out_ptr + s_off, sf.to(s_out_ptr.dtype.element_ty))


def check_pow2_block(block_size: tuple[int, int]) -> None:
    if any(b & (b - 1) for b in block_size):
        raise ValueError(f"the Triton kernels need power-of-two block sizes, got {block_size}")


def quant_fp8_block(
    x: torch.Tensor,
    *,
    block_size=nx.DEFAULT_BLOCK_SIZE,
    scale_fmt: str = "float",
    scale_dtype: torch.dtype = torch.float32,
    amax_floor: float = nx.DEFAULT_AMAX_FLOOR,
    scale_inv: torch.Tensor | None = None,
    x_scale_inv: torch.Tensor | None = None,
    num_warps: int = NUM_WARPS,
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `x` ([M, N] or [E, M, N]) to e4m3 with one scale per block; see fp8norm.kernels.numerics.fp8_block.

    Returns `(q, scale_inv)` with `x ~= q * scale_inv` per tile. With `scale_inv` given, the amax is
    skipped and those scales are applied with a saturating cast; the given tensor is returned.
    An FP8 `x` comes with `x_scale_inv` (its block scales, same block_size) and is requantized in
    one pass, without a high-precision copy.

    NaN/Inf input raises ValueError naming the first bad tile: the kernel marks such tiles with a NaN
    scale, read back in the call's one host sync. `check_finite=False` skips that sync, so the launch
    stays asynchronous (for timing the kernel alone); NaN/Inf input then goes unreported.
    """
    (bm, bn), given, x_sf = check_quant_args(x, block_size, scale_fmt, scale_dtype, amax_floor, scale_inv,
                                              x_scale_inv)
    check_pow2_block((bm, bn))
    x3 = as_3d(x)
    n_exp, m, n = x3.shape
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    s_shape = nx.scale_inv_shape(tuple(x.shape), (bm, bn))
    # With given scales the kernel still writes the scale it used (NaN for a non-finite tile).
    s_out = torch.empty(s_shape, dtype=torch.float32 if given is not None else scale_dtype, device=x.device)
    if x.numel():
        q3, s3 = as_3d(q), as_3d(s_out)
        s_kernel = s3.view(torch.uint8) if s3.dtype == torch.float8_e8m0fnu else s3
        grid = (s3.shape[2], s3.shape[1], n_exp)
        quant_fp8_block_kernel[grid](
            x3, q3, given if given is not None else s_kernel, s_kernel, x_sf if x_sf is not None else s_kernel,
            m, n,
            x3.stride(0), x3.stride(1), x3.stride(2),
            q3.stride(0), q3.stride(1),
            s3.stride(0), s3.stride(1),
            float(amax_floor),
            BLOCK_M=bm, BLOCK_N=bn,
            SCALE_DROP_BITS=nx.scale_round_bits(scale_fmt, scale_dtype) if given is None else 0,
            SCALE_OUT=_SCALE_OUT[s_out.dtype],
            GIVEN_SCALE=given is not None,
            X_SCALED=x_sf is not None,
            num_warps=num_warps,
            **LAUNCH_OPTIONS,
        )
    if check_finite:
        raise_if_nonfinite_tiles(s_out)
    return q, (scale_inv if given is not None else s_out)
