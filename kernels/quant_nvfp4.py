"""NVFP4 quantization (E2M1 values, per-16 e4m3 scales, fp32 global scale) and dequantization.

One program per (expert, row tile, column tile); 2D and stacked 3D `[E, M, N]` inputs share a single
launch. The quant kernel also takes an FP8 input with its block scales and quantizes the dequantized
values (x.float() * scale, as dequant_fp8_block computes them) in the same pass, with no bf16 copy.
The formulas (ModelOpt's NVFP4QTensor) are in fp8norm.numerics_nvfp4.
Twins: fp8norm.reference.quant_nvfp4 / dequant_nvfp4; nvfp4_amax is torch only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fp8norm import numerics_nvfp4 as n4
from fp8norm.reference.nvfp4 import amax_per_expert, nvfp4_amax

from ._launch import LAUNCH_OPTIONS, NUM_WARPS
from ._numerics import E4M3_MAX, cast_rne, load_e4m3_as_f32, round_to_e4m3_grid, tile_coords
from .quant_fp8_block import _as_3d

__all__ = ["quant_nvfp4", "dequant_nvfp4", "nvfp4_amax", "quant_nvfp4_kernel", "dequant_nvfp4_kernel"]

# Tile of one program. 64 x 128 keeps the [rows, groups, 16] tile without spills at NUM_WARPS.
BLOCK_M = 64
BLOCK_N = 128


@triton.jit
def e2m1_code(q):
    """fp32 -> int32 E2M1 code: nearest magnitude, ties to the even code, saturating at 6; sign = q < 0."""
    a = tl.abs(q)
    code = ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
            + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32)
            + (a > 5.0).to(tl.int32))
    return code | tl.where(q < 0, 8, 0)


@triton.jit
def e2m1_value(code):
    """int32 code (0..15) -> fp32 value; code 8 is -0.0."""
    mag = code & 7
    # Codes 2..7 are normal: exponent (mag >> 1) - 1, one mantissa bit (mag & 1). Codes 0, 1: 0, 0.5.
    normal = ((((mag >> 1) + 126) << 23) | ((mag & 1) << 22)).to(tl.float32, bitcast=True)
    v = tl.where(mag < 2, mag.to(tl.float32) * 0.5, normal)
    return tl.where(code >= 8, -v, v)


@triton.jit
def quant_nvfp4_kernel(
    x_ptr, xs_ptr, s2_ptr, p_ptr, w_ptr,
    M, N,
    stride_xe, stride_xm, stride_xn,
    stride_xse, stride_xsm,
    stride_pe, stride_pm,
    stride_we, stride_wm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr,
    SRC_BM: tl.constexpr, SRC_BN: tl.constexpr,
    X_SCALED: tl.constexpr,
):
    NG: tl.constexpr = BLOCK_N // GROUP
    # Ragged edges are masked; whole groups only (N % GROUP == 0), masked lanes read 0.
    pid_e, pid_m, pid_n, rows, cols, mask = tile_coords(M, N, BLOCK_M, BLOCK_N)
    x_offs = pid_e * stride_xe + rows[:, None] * stride_xm + cols[None, :] * stride_xn
    if X_SCALED:
        # FP8 input: x.float() * its block scale (fp32 multiply, exactly dequant_fp8_block's value).
        xs_offs = pid_e * stride_xse + (rows // SRC_BM)[:, None] * stride_xsm + (cols // SRC_BN)[None, :]
        x = load_e4m3_as_f32(x_ptr + x_offs, mask) * tl.load(xs_ptr + xs_offs, mask=mask, other=0.0)
    else:
        x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(s2_ptr + pid_e)

    x3 = tl.reshape(x, (BLOCK_M, NG, GROUP))
    ax3 = tl.abs(x3)
    gamax = tl.max(ax3, axis=2)
    # NaN and Inf fail `< inf`; such groups get the e4m3 NaN code and the wrapper raises.
    nonfinite = tl.max(tl.where(ax3 < float("inf"), 0, 1), axis=2) > 0
    # div_rn: IEEE division, as torch does (plain `/` may lower to approximate div.full).
    s = tl.math.div_rn(gamax, 6.0 * s2)
    s = tl.where(s == 0.0, 1.0, s)
    # Saturating RNE onto the e4m3 grid in fp32 (s >= 0); the cast below is then exact everywhere.
    s_q = round_to_e4m3_grid(tl.minimum(s, E4M3_MAX))
    d = s_q * s2
    # A group whose scale rounds to e4m3 zero (or underflows with scale_2) quantizes to 0.
    q = tl.math.div_rn(x3, tl.broadcast_to(tl.where(d == 0.0, 1.0, d)[:, :, None], (BLOCK_M, NG, GROUP)))
    q = tl.where((d == 0.0)[:, :, None], 0.0, q)
    lo, hi = tl.split(tl.reshape(e2m1_code(q), (BLOCK_M, BLOCK_N // 2, 2)))
    packed = (lo | (hi << 4)).to(tl.uint8)
    pcols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    tl.store(p_ptr + pid_e * stride_pe + rows[:, None] * stride_pm + pcols[None, :], packed,
             mask=(rows[:, None] < M) & (pcols[None, :] < N // 2))

    w = s_q.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    w = tl.where(nonfinite, 0x7F, w).to(tl.uint8)
    gcols = pid_n * NG + tl.arange(0, NG)
    tl.store(w_ptr + pid_e * stride_we + rows[:, None] * stride_wm + gcols[None, :], w,
             mask=(rows[:, None] < M) & (gcols[None, :] < N // GROUP))


@triton.jit
def dequant_nvfp4_kernel(
    p_ptr, w_ptr, s2_ptr, out_ptr,
    M, N,
    stride_pe, stride_pm, stride_pn,
    stride_we, stride_wm, stride_wn,
    stride_oe, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr,
):
    NG: tl.constexpr = BLOCK_N // GROUP
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_e = tl.program_id(2).to(tl.int64)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows[:, None] < M
    pcols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    p = tl.load(p_ptr + pid_e * stride_pe + rows[:, None] * stride_pm + pcols[None, :] * stride_pn,
                mask=rmask & (pcols[None, :] < N // 2), other=0).to(tl.int32)
    code = tl.reshape(tl.join(p & 0xF, p >> 4), (BLOCK_M, NG, GROUP))
    gcols = pid_n * NG + tl.arange(0, NG)
    w = tl.load(w_ptr + pid_e * stride_we + rows[:, None] * stride_wm + gcols[None, :] * stride_wn,
                mask=rmask & (gcols[None, :] < N // GROUP), other=0.0).to(tl.float32)
    d = w * tl.load(s2_ptr + pid_e)
    out = tl.reshape(e2m1_value(code) * d[:, :, None], (BLOCK_M, BLOCK_N))
    out = cast_rne(out, out_ptr.dtype.element_ty)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(out_ptr + pid_e * stride_oe + rows[:, None] * stride_om + cols[None, :], out,
             mask=rmask & (cols[None, :] < N))


def quant_nvfp4(
    x: torch.Tensor,
    *,
    global_amax: torch.Tensor | None = None,
    src_scale_inv: torch.Tensor | None = None,
    src_block_size=(128, 128),
    group_size: int = n4.GROUP_SIZE,
    num_warps: int = NUM_WARPS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize `x` ([M, N] or [E, M, N]) to NVFP4; see fp8norm.numerics_nvfp4.

    Returns `(packed uint8 [..., M, N/2], weight_scale e4m3 [..., M, N/group_size], weight_scale_2)`,
    weight_scale_2 fp32 0-dim for 2D, `[E]` for 3D. `global_amax` (scalar, or `[E]` for 3D) fixes
    weight_scale_2 = global_amax / (6 * 448), e.g. the joint amax of q/k/v; by default it is
    nvfp4_amax(x). An FP8 `x` comes with `src_scale_inv`, its block scales (fp32, bf16 or e8m0,
    blocks of `src_block_size`). N % group_size != 0 and NaN/Inf input raise ValueError.
    """
    g, (sbm, sbn), src_sf, ga = n4.check_quant_args(x, global_amax, src_scale_inv, src_block_size, group_size)
    if ga is None:
        ga = amax_per_expert(x, src_sf, (sbm, sbn))
        n4.raise_if_nonfinite_amax(ga if x.dim() == 3 else ga.reshape(()))
    scale_2 = n4.scale_2_for(x, ga)
    *lead, m, n = x.shape
    packed = torch.empty((*lead, m, n // 2), dtype=torch.uint8, device=x.device)
    weight_scale = torch.empty((*lead, m, n // g), dtype=torch.float8_e4m3fn, device=x.device)
    if x.numel():
        x3, p3, w3 = _as_3d(x), _as_3d(packed), _as_3d(weight_scale).view(torch.uint8)
        s2 = scale_2.reshape(-1).contiguous()
        xs3 = _as_3d(src_sf) if src_sf is not None else s2.view(1, 1, -1)  # placeholder when not FP8
        bn = max(BLOCK_N, g)
        grid = (triton.cdiv(n, bn), triton.cdiv(m, BLOCK_M), x3.shape[0])
        quant_nvfp4_kernel[grid](
            x3, xs3, s2, p3, w3,
            m, n,
            x3.stride(0), x3.stride(1), x3.stride(2),
            xs3.stride(0), xs3.stride(1),
            p3.stride(0), p3.stride(1),
            w3.stride(0), w3.stride(1),
            BLOCK_M=BLOCK_M, BLOCK_N=bn, GROUP=g,
            SRC_BM=sbm, SRC_BN=sbn,
            X_SCALED=src_sf is not None,
            num_warps=num_warps,
            **LAUNCH_OPTIONS,
        )
    n4.raise_if_nonfinite_groups(weight_scale)
    return packed, weight_scale, scale_2


def dequant_nvfp4(
    packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_scale_2: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
    num_warps: int = NUM_WARPS,
) -> torch.Tensor:
    """`e2m1 * (float(weight_scale) * weight_scale_2)` for packed `[M, N/2]` or `[E, M, N/2]`, as out_dtype."""
    g, s2 = n4.check_dequant_args(packed, weight_scale, weight_scale_2, out_dtype)
    *lead, m, half = packed.shape
    n = 2 * half
    out = torch.empty((*lead, m, n), dtype=out_dtype, device=packed.device)
    if out.numel():
        p3, w3, o3 = _as_3d(packed), _as_3d(weight_scale), _as_3d(out)
        bn = max(BLOCK_N, g)
        grid = (triton.cdiv(n, bn), triton.cdiv(m, BLOCK_M), p3.shape[0])
        dequant_nvfp4_kernel[grid](
            p3, w3, s2, o3,
            m, n,
            p3.stride(0), p3.stride(1), p3.stride(2),
            w3.stride(0), w3.stride(1), w3.stride(2),
            o3.stride(0), o3.stride(1),
            BLOCK_M=BLOCK_M, BLOCK_N=bn, GROUP=g,
            num_warps=num_warps,
            **LAUNCH_OPTIONS,
        )
    return out
