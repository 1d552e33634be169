"""NVFP4 quantization (E2M1 values, per-16 e4m3 scales, fp32 global scale) and dequantization.

One program per (expert, row tile, column tile); 2D and stacked 3D `[E, M, N]` inputs share a single
launch. The quant kernel also takes an FP8 input with its block scales and quantizes the dequantized
values (x.float() * scale, as dequant_fp8_block computes them) in the same pass, with no bf16 copy.
The global amax is a Triton reduction too (one atomic max per tile), so a quantization is two
launches and one host sync (the NaN/Inf check at the end).
The formulas (ModelOpt's NVFP4QTensor) are in fp8norm.kernels.numerics.nvfp4.
Twins: fp8norm.reference.quant_nvfp4 / dequant_nvfp4 / nvfp4_amax.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .numerics import nvfp4 as n4
from .numerics.args import check_amax_args

from ._launch import LAUNCH_OPTIONS, as_3d, kernel, launch_group_dequant
from ._device import (E4M3_MAX, amax_nan, cast_rne, load_e4m3_as_f32, not_finite, round_to_e4m3_grid,
                        tile_coords, widen_to_f32)

__all__ = ["quant_nvfp4", "dequant_nvfp4", "nvfp4_amax", "quant_nvfp4_kernel", "dequant_nvfp4_kernel",
           "nvfp4_amax_kernel"]

# Tile of one program. 64 x 128 keeps the [rows, groups, 16] tile without spills at NUM_WARPS.
BLOCK_M = 64
BLOCK_N = 128
# 4 warps: 64 elements a thread, ~128 registers, 4 blocks per SM on sm_90; quant 23 instructions per
# element (8 warps: 25.4, 16: 29.6). `python tools/aot_compile.py --sweep-warps 2,4,8,16`.
NUM_WARPS = 4
# Smallest e4m3 scale ModelOpt stores (its _cast_per_block_scale_to_fp8 clamps to [2^-9, 448]).
SCALE_MIN = tl.constexpr(2.0 ** -9)
# Below this weight_scale_2 a group divisor's reciprocal could leave fp32's normal range; such
# tensors (amax < ~5e-27) are quantized again with IEEE divisions (see quant_nvfp4).
TINY_SCALE_2 = 2.0 ** -100


@kernel
def e2m1_code(q):
    """fp32 -> int32 E2M1 code: nearest magnitude, ties to the even code, saturating at 6; sign = q < 0.

    The E2M1 grid steps by 0.5 below 2, by 1 below 4 and by 2 up to 6: 2^(E-1) for |q| in [2^E, 2^(E+1)),
    E = 0..2 (|q| < 1 counting as E = 0). Adding 2^(22+E) makes the fp32 ulp equal that step, so the add
    rounds onto the grid, ties to even; the low bits of the sum then count grid steps. Adding 2E more
    ulps (even: ties unchanged) makes that count the code itself. Every |q| above 5 rounds to 6 (code 7),
    so |q| is clamped to 6 first.
    """
    a = tl.minimum(tl.abs(q), 6.0)
    t = tl.maximum(a, 1.0).to(tl.int32, bitcast=True) & 0x7F800000  # (127 + E) << 23
    magic = t + (22 << 23) + ((t >> 22) - 254)  # 2^(22+E) + 2E ulps
    m = (a + magic.to(tl.float32, bitcast=True)).to(tl.int32, bitcast=True)
    return (m & 0xF) | tl.where(q < 0, 8, 0)


@kernel
def e2m1_value(code):
    """int32 code (0..15) -> fp32 value; code 8 is -0.0."""
    mag = code & 7
    # Codes 2..7 are normal: exponent (mag >> 1) - 1, one mantissa bit (mag & 1). Codes 0, 1: 0, 0.5.
    normal = ((((mag >> 1) + 126) << 23) | ((mag & 1) << 22)).to(tl.float32, bitcast=True)
    v = tl.where(mag < 2, mag.to(tl.float32) * 0.5, normal)
    return tl.where(code >= 8, -v, v)


@kernel
def divide_by(x, r, d):
    """x / d rounded once (IEEE), given r = 1/d rounded once: q0 = x*r, then q0 + (x - q0*d) * r in two
    FMAs (the residual is exact). Correctly rounded when r and x/d stay normal fp32 (Markstein)."""
    q0 = x * r
    return tl.fma(tl.fma(-q0, d, x), r, q0)


@kernel
def load_source(x_ptr, xs_ptr, pid_e, rows, cols, mask, stride_xe, stride_xm, stride_xn, stride_xse, stride_xsm,
                SRC_BM: tl.constexpr, SRC_BN: tl.constexpr, X_SCALED: tl.constexpr, INTERPRET: tl.constexpr):
    """The tile as fp32: x itself, or for an FP8 x, x.float() * its block scale (dequant_fp8_block's value)."""
    x_offs = pid_e * stride_xe + rows[:, None] * stride_xm + cols[None, :] * stride_xn
    if X_SCALED:
        xs_offs = pid_e * stride_xse + (rows // SRC_BM)[:, None] * stride_xsm + (cols // SRC_BN)[None, :]
        return load_e4m3_as_f32(x_ptr + x_offs, mask, INTERPRET) * tl.load(xs_ptr + xs_offs, mask=mask, other=0.0)
    return widen_to_f32(tl.load(x_ptr + x_offs, mask=mask, other=0.0), INTERPRET)


@kernel
def nvfp4_amax_kernel(
    x_ptr, xs_ptr, amax_ptr,
    M, N,
    stride_xe, stride_xm, stride_xn,
    stride_xse, stride_xsm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SRC_BM: tl.constexpr, SRC_BN: tl.constexpr,
    X_SCALED: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Per expert max |x| into amax_ptr (int32 bits of a non-negative fp32, zero-initialized).

    Non-negative floats order like their bits as int32, NaN above Inf, so an integer atomic max is the
    NaN-propagating float max, and independent of the order the tiles finish in."""
    pid_e, pid_m, pid_n, rows, cols, mask = tile_coords(M, N, BLOCK_M, BLOCK_N)
    x = load_source(x_ptr, xs_ptr, pid_e, rows, cols, mask, stride_xe, stride_xm, stride_xn, stride_xse,
                    stride_xsm, SRC_BM, SRC_BN, X_SCALED, INTERPRET)
    amax = amax_nan(tl.abs(x), None, INTERPRET)
    tl.atomic_max(amax_ptr + pid_e, amax.to(tl.int32, bitcast=True))


@kernel
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
    EXACT_DIV: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    NG: tl.constexpr = BLOCK_N // GROUP
    # Ragged edges are masked; whole groups only (N % GROUP == 0), masked lanes read 0.
    pid_e, pid_m, pid_n, rows, cols, mask = tile_coords(M, N, BLOCK_M, BLOCK_N)
    x = load_source(x_ptr, xs_ptr, pid_e, rows, cols, mask, stride_xe, stride_xm, stride_xn, stride_xse,
                    stride_xsm, SRC_BM, SRC_BN, X_SCALED, INTERPRET)
    s2 = tl.load(s2_ptr + pid_e)

    x3 = tl.reshape(x, (BLOCK_M, NG, GROUP))
    # One reduction per group: its scale and, through NaN propagation, whether it is finite.
    gamax = amax_nan(tl.abs(x3), 2, INTERPRET)
    if INTERPRET or EXACT_DIV:
        # The formulas as written (ModelOpt's, in fp32), with IEEE divisions.
        s = tl.math.div_rn(gamax, 6.0 * s2)
    else:
        # One reciprocal per program for the group scales and one per group for the values, each
        # division finished by `divide_by`: exact while the reciprocals stay normal, i.e. for
        # scale_2 >= 2^-100; the wrapper relaunches with EXACT_DIV for smaller ones.
        d6 = 6.0 * s2
        r6 = tl.math.div_rn(1.0, d6)
        s = divide_by(gamax, r6, d6)
        s = tl.where(gamax * r6 > E4M3_MAX, E4M3_MAX, s)  # clamped below anyway; no Inf - Inf
    # ModelOpt: 0 -> 1, clamped to [2^-9, 448] (_cast_per_block_scale_to_fp8), RNE to e4m3.
    s = tl.where(s == 0.0, 1.0, s)
    s = tl.minimum(tl.maximum(s, SCALE_MIN), E4M3_MAX)
    if INTERPRET:
        s_q = round_to_e4m3_grid(s)  # the interpreter's cast needs on-grid values
        w = s_q.to(tl.float8e4nv)
    else:
        w = s.to(tl.float8e4nv)  # in range: plain RNE
        s_q = w.to(tl.float32)
    d = s_q * s2
    if INTERPRET or EXACT_DIV:
        # d underflows to 0 only for scale_2 below ~2^-140: such groups quantize to 0.
        q = tl.math.div_rn(x3, tl.where(d == 0.0, 1.0, d)[:, :, None])
        q = tl.where((d == 0.0)[:, :, None], 0.0, q)
    else:
        q = divide_by(x3, tl.math.div_rn(1.0, d)[:, :, None], d[:, :, None])
    lo, hi = tl.split(tl.reshape(e2m1_code(q), (BLOCK_M, BLOCK_N // 2, 2)))
    packed = (lo | (hi << 4)).to(tl.uint8)
    pcols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    tl.store(p_ptr + pid_e * stride_pe + rows[:, None] * stride_pm + pcols[None, :], packed,
             mask=(rows[:, None] < M) & (pcols[None, :] < N // 2))

    # Groups holding NaN/Inf get e4m3's NaN code as their scale; the wrapper raises naming the first.
    w = tl.where(not_finite(gamax), 0x7F, w.to(tl.uint8, bitcast=True)).to(tl.uint8)
    gcols = pid_n * NG + tl.arange(0, NG)
    tl.store(w_ptr + pid_e * stride_we + rows[:, None] * stride_wm + gcols[None, :], w,
             mask=(rows[:, None] < M) & (gcols[None, :] < N // GROUP))


@kernel
def dequant_nvfp4_kernel(
    p_ptr, w_ptr, s2_ptr, out_ptr,
    M, N,
    stride_pe, stride_pm, stride_pn,
    stride_we, stride_wm, stride_wn,
    stride_oe, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr,
    INTERPRET: tl.constexpr,
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
    w = load_e4m3_as_f32(w_ptr + pid_e * stride_we + rows[:, None] * stride_wm + gcols[None, :] * stride_wn,
                         rmask & (gcols[None, :] < N // GROUP), INTERPRET)
    d = w * tl.load(s2_ptr + pid_e)
    out = tl.reshape(e2m1_value(code) * d[:, :, None], (BLOCK_M, BLOCK_N))
    out = cast_rne(out, out_ptr.dtype.element_ty, INTERPRET)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(out_ptr + pid_e * stride_oe + rows[:, None] * stride_om + cols[None, :], out,
             mask=rmask & (cols[None, :] < N))


def _amax_per_expert(x, src_sf, src_block, num_warps) -> torch.Tensor:
    """max |value| of each matrix of x (validated) as fp32 `[E]` on x's device; NaN if it holds NaN."""
    x3 = as_3d(x)
    amax_bits = torch.zeros(x3.shape[0], dtype=torch.int32, device=x.device)
    if x.numel():
        xs3 = as_3d(src_sf) if src_sf is not None else amax_bits.view(torch.float32).view(1, 1, -1)  # placeholder
        m, n = x3.shape[1:]
        grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(m, BLOCK_M), x3.shape[0])
        nvfp4_amax_kernel[grid](
            x3, xs3, amax_bits,
            m, n,
            x3.stride(0), x3.stride(1), x3.stride(2),
            xs3.stride(0), xs3.stride(1),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            SRC_BM=src_block[0], SRC_BN=src_block[1],
            X_SCALED=src_sf is not None,
            num_warps=num_warps,
            **LAUNCH_OPTIONS,
        )
    return amax_bits.view(torch.float32)


def nvfp4_amax(x: torch.Tensor, *, src_scale_inv: torch.Tensor | None = None, src_block_size=(128, 128),
               num_warps: int = NUM_WARPS) -> torch.Tensor:
    """Triton twin of fp8norm.reference.nvfp4_amax: fp32 amax, 0-dim for 2D x, `[E]` for 3D; NaN/Inf raise."""
    src_sf, block_size = check_amax_args(x, src_scale_inv, src_block_size)
    amax = _amax_per_expert(x, src_sf, block_size, num_warps)
    amax = amax.reshape(()) if x.dim() == 2 else amax
    n4.raise_if_nonfinite_amax(amax)
    return amax


def quant_nvfp4(
    x: torch.Tensor,
    *,
    global_amax: torch.Tensor | None = None,
    src_scale_inv: torch.Tensor | None = None,
    src_block_size=(128, 128),
    group_size: int = n4.GROUP_SIZE,
    num_warps: int = NUM_WARPS,
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize `x` ([M, N] or [E, M, N]) to NVFP4; see fp8norm.kernels.numerics.nvfp4.

    Returns `(packed uint8 [..., M, N/2], weight_scale e4m3 [..., M, N/group_size], weight_scale_2)`,
    weight_scale_2 fp32 0-dim for 2D, `[E]` for 3D. `global_amax` (scalar, or `[E]` for 3D) fixes
    weight_scale_2 = global_amax / (6 * 448), e.g. the joint amax of q/k/v; by default it is
    nvfp4_amax(x), computed on the device without a host sync. An FP8 `x` comes with `src_scale_inv`,
    its block scales (fp32, bf16 or e8m0, blocks of `src_block_size`). N % group_size != 0 raises
    ValueError; so does NaN/Inf input, found in the call's one host sync at the end.
    `check_finite=False` skips that sync, for timing the kernels alone: NaN/Inf input then goes
    unreported, and a tensor with amax below ~5e-27 is not requantized with IEEE divisions.
    """
    g, (sbm, sbn), src_sf, ga = n4.check_quant_args(x, global_amax, src_scale_inv, src_block_size, group_size)
    amax_computed = ga is None
    if amax_computed:
        ga = _amax_per_expert(x, src_sf, (sbm, sbn), num_warps)
    scale_2 = n4.scale_2_for(x, ga)
    *lead, m, n = x.shape
    packed = torch.empty((*lead, m, n // 2), dtype=torch.uint8, device=x.device)
    weight_scale = torch.empty((*lead, m, n // g), dtype=torch.float8_e4m3fn, device=x.device)
    if not x.numel():
        return packed, weight_scale, scale_2
    x3, p3, w3 = as_3d(x), as_3d(packed), as_3d(weight_scale).view(torch.uint8)
    s2 = scale_2.reshape(-1).contiguous()
    xs3 = as_3d(src_sf) if src_sf is not None else s2.view(1, 1, -1)  # placeholder when not FP8
    bn = max(BLOCK_N, g)
    grid = (triton.cdiv(n, bn), triton.cdiv(m, BLOCK_M), x3.shape[0])

    def launch(exact_div: bool):
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
            EXACT_DIV=exact_div,
            num_warps=num_warps,
            **LAUNCH_OPTIONS,
        )

    launch(False)
    if check_finite:
        # The call's one host sync: NaN/Inf anywhere, and whether a scale_2 is too small for the
        # reciprocal-based division (then the kernel runs again with IEEE divisions).
        tiny, bad = torch.stack([(s2 < TINY_SCALE_2).any(), n4.nonfinite_flag(ga, weight_scale, amax_computed)]
                                ).tolist()
        if tiny:
            launch(True)
        if bad:
            n4.raise_if_nonfinite(ga if x.dim() == 3 else ga.reshape(()), weight_scale, amax_computed)
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
        launch_group_dequant(dequant_nvfp4_kernel, packed, weight_scale, out, s2, block_m=BLOCK_M,
                             block_n=max(BLOCK_N, g), num_warps=num_warps, GROUP=g)
    return out
