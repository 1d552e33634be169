"""MXFP8 / MXFP4 (OCP Microscaling: blocks of 32 along the input dim, E8M0 shared scale, E4M3 or
E2M1 elements) quantization and dequantization.

One program per (expert, row tile, column tile); 2D and stacked 3D `[E, M, N]` inputs share a single
launch. The quant kernel also takes an FP8 input with its block scales and quantizes the dequantized
values in the same pass (no bf16 copy). Formulas and the shared-scale rules (rceil, the spec's floor,
compressed-tensors' round-up at 1.75): fp8norm.kernels.numerics.mx. Twins: fp8norm.reference.quant_mx /
dequant_mx.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .numerics import mx

from ._launch import LAUNCH_OPTIONS, as_3d, kernel, launch_group_dequant
from ._device import amax_nan, cast_rne, load_e4m3_as_f32, not_finite, tile_coords, to_e4m3
from .quant_nvfp4 import e2m1_code, e2m1_value, load_source

__all__ = ["quant_mx", "dequant_mx", "quant_mx_kernel", "dequant_mx_kernel"]

# Tile of one program: 64 rows x 4 blocks of 32, as the NVFP4 kernels (no spills at NUM_WARPS).
BLOCK_M = 64
BLOCK_N = 128
NUM_WARPS = 4
GROUP: tl.constexpr = tl.constexpr(mx.MX_BLOCK)


@kernel
def quant_mx_kernel(
    x_ptr, xs_ptr, p_ptr, w_ptr,
    M, N,
    stride_xe, stride_xm, stride_xn,
    stride_xse, stride_xsm,
    stride_pe, stride_pm,
    stride_we, stride_wm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SRC_BM: tl.constexpr, SRC_BN: tl.constexpr,
    EMAX: tl.constexpr, ELEM_BITS: tl.constexpr, ROUND_ADD: tl.constexpr,
    X_SCALED: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    NG: tl.constexpr = BLOCK_N // GROUP
    # Ragged edges are masked; whole blocks only (N % 32 == 0), masked lanes read 0.
    pid_e, pid_m, pid_n, rows, cols, mask = tile_coords(M, N, BLOCK_M, BLOCK_N)
    x = load_source(x_ptr, xs_ptr, pid_e, rows, cols, mask, stride_xe, stride_xm, stride_xn, stride_xse,
                    stride_xsm, SRC_BM, SRC_BN, X_SCALED, INTERPRET)
    x3 = tl.reshape(x, (BLOCK_M, NG, GROUP))
    # One reduction per block: its scale and, through NaN propagation, whether it is finite (a
    # NaN/Inf block gets the E8M0 NaN code and the wrapper raises).
    amax = amax_nan(tl.abs(x3), 2, INTERPRET)
    nonfinite = not_finite(amax)
    # The amax's biased exponent (0 for zero/subnormal; ROUND_ADD carries into it where the rule rounds
    # up) minus emax_elem, clamped to [0, 254 - emax_elem] (elem_max * X stays finite).
    bits = amax.to(tl.int32, bitcast=True) + ROUND_ADD
    code = tl.minimum(tl.maximum(((bits >> 23) & 0xFF) - EMAX, 0), 254 - EMAX)
    # 2^(127 - code) as fp32 bits: x * inv == x / 2^(code - 127) exactly.
    inv = ((254 - tl.minimum(code, 253)) << 23).to(tl.float32, bitcast=True)
    v = x3 * inv[:, :, None]
    if ELEM_BITS == 8:
        q = tl.reshape(to_e4m3(v, INTERPRET), (BLOCK_M, BLOCK_N))
        tl.store(p_ptr + pid_e * stride_pe + rows[:, None] * stride_pm + cols[None, :], q, mask=mask)
    else:
        lo, hi = tl.split(tl.reshape(e2m1_code(v), (BLOCK_M, BLOCK_N // 2, 2)))
        packed = (lo | (hi << 4)).to(tl.uint8)
        pcols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(p_ptr + pid_e * stride_pe + rows[:, None] * stride_pm + pcols[None, :], packed,
                 mask=(rows[:, None] < M) & (pcols[None, :] < N // 2))
    code = tl.where(nonfinite, 255, code).to(tl.uint8)
    gcols = pid_n * NG + tl.arange(0, NG)
    tl.store(w_ptr + pid_e * stride_we + rows[:, None] * stride_wm + gcols[None, :], code,
             mask=(rows[:, None] < M) & (gcols[None, :] < N // GROUP))


@kernel
def dequant_mx_kernel(
    p_ptr, w_ptr, out_ptr,
    M, N,
    stride_pe, stride_pm, stride_pn,
    stride_we, stride_wm, stride_wn,
    stride_oe, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ELEM_BITS: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    NG: tl.constexpr = BLOCK_N // GROUP
    pid_e, pid_m, pid_n, rows, cols, mask = tile_coords(M, N, BLOCK_M, BLOCK_N)
    rmask = rows[:, None] < M
    if ELEM_BITS == 8:
        e = load_e4m3_as_f32(p_ptr + pid_e * stride_pe + rows[:, None] * stride_pm + cols[None, :] * stride_pn, mask,
                             INTERPRET)
        e3 = tl.reshape(e, (BLOCK_M, NG, GROUP))
    else:
        pcols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        p = tl.load(p_ptr + pid_e * stride_pe + rows[:, None] * stride_pm + pcols[None, :] * stride_pn,
                    mask=rmask & (pcols[None, :] < N // 2), other=0).to(tl.int32)
        e3 = e2m1_value(tl.reshape(tl.join(p & 0xF, p >> 4), (BLOCK_M, NG, GROUP)))
    gcols = pid_n * NG + tl.arange(0, NG)
    code = tl.load(w_ptr + pid_e * stride_we + rows[:, None] * stride_wm + gcols[None, :] * stride_wn,
                   mask=rmask & (gcols[None, :] < N // GROUP), other=127).to(tl.int32)
    # 2^(code - 127) as fp32 bits; code 0 is the subnormal 2^-127.
    scale = tl.where(code == 0, 1 << 22, code << 23).to(tl.float32, bitcast=True)
    out = tl.reshape(e3 * scale[:, :, None], (BLOCK_M, BLOCK_N))
    out = cast_rne(out, out_ptr.dtype.element_ty, INTERPRET)
    tl.store(out_ptr + pid_e * stride_oe + rows[:, None] * stride_om + cols[None, :], out, mask=mask)


def quant_mx(
    x: torch.Tensor,
    *,
    fmt: str = "mxfp8",
    rule: str = mx.DEFAULT_RULE,
    src_scale_inv: torch.Tensor | None = None,
    src_block_size=(128, 128),
    num_warps: int = NUM_WARPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `x` ([M, N] or [E, M, N], N % 32 == 0) to MXFP8 or MXFP4; see fp8norm.kernels.numerics.mx.

    Returns `(elements, scale)`: e4m3 `[..., M, N]` (mxfp8) or packed E2M1 uint8 `[..., M, N/2]`
    (mxfp4), and uint8 E8M0 codes `[..., M, N/32]`. `rule`: "rceil" (the smallest power of two that
    clips nothing), "ocp" (the spec's floor) or "ct" (compressed-tensors/llm-compressor). An FP8 `x` comes with `src_scale_inv`, its block scales.
    """
    f, round_add, src_sf, (sbm, sbn) = mx.check_quant_args(x, fmt, rule, src_scale_inv, src_block_size)
    elem_dtype = torch.float8_e4m3fn if f.elem_bits == 8 else torch.uint8
    out = torch.empty(mx.packed_shape(tuple(x.shape), f), dtype=elem_dtype, device=x.device)
    scale = torch.empty(mx.scale_shape(tuple(x.shape)), dtype=torch.uint8, device=x.device)
    if x.numel():
        x3, p3, w3 = as_3d(x), as_3d(out), as_3d(scale)
        xs3 = as_3d(src_sf) if src_sf is not None else w3  # placeholder when x is not FP8
        n_exp, m, n = x3.shape
        grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(m, BLOCK_M), n_exp)
        quant_mx_kernel[grid](
            x3, xs3, p3, w3,
            m, n,
            x3.stride(0), x3.stride(1), x3.stride(2),
            xs3.stride(0), xs3.stride(1),
            p3.stride(0), p3.stride(1),
            w3.stride(0), w3.stride(1),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, SRC_BM=sbm, SRC_BN=sbn,
            EMAX=f.emax, ELEM_BITS=f.elem_bits, ROUND_ADD=round_add,
            X_SCALED=src_sf is not None,
            num_warps=num_warps,
            **LAUNCH_OPTIONS,
        )
    mx.raise_if_nan_scales(scale)
    return out, scale


def dequant_mx(stored: torch.Tensor, scale: torch.Tensor, *, fmt: str = "mxfp8",
               out_dtype: torch.dtype = torch.bfloat16, num_warps: int = NUM_WARPS) -> torch.Tensor:
    """`element * 2^(code - 127)` per block of 32 for `[M, *]` or `[E, M, *]`, as out_dtype."""
    f, n = mx.check_dequant_args(stored, scale, fmt, out_dtype)
    *lead, m, _ = stored.shape
    out = torch.empty((*lead, m, n), dtype=out_dtype, device=stored.device)
    if out.numel():
        launch_group_dequant(dequant_mx_kernel, stored, scale, out, block_m=BLOCK_M, block_n=BLOCK_N,
                             num_warps=num_warps, ELEM_BITS=f.elem_bits)
    return out
