"""int4 weight-only W4A16 (compressed-tensors `pack-quantized`, symmetric, groups of 128 along the input
dim) quantization and dequantization.

One program per (expert, row tile, column tile); 2D and stacked 3D `[E, M, N]` inputs share a single
launch. The quant kernel reads the weight once: group amax, scale, quotient, round, clamp and the
packing into int32 words happen in registers. Formulas (compressed-tensors' and llm-compressor's, with
their sources): fp8norm.kernels.numerics.int4. Twins: fp8norm.reference.quant_int4 / dequant_int4.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .numerics import int4

from ._launch import LAUNCH_OPTIONS, as_3d, kernel, launch_group_dequant
from ._device import amax_nan, cast_rne, round_to_bf16_grid, tile_coords

__all__ = ["quant_int4", "dequant_int4", "quant_int4_kernel", "dequant_int4_kernel"]

# Tile of one program: 64 rows x 128 columns (one group of 128, or several smaller ones).
BLOCK_M = 64
BLOCK_N = 128
# 4 warps: 112 registers, 4 blocks per SM, 19.75 SASS per element on sm_90 (2: 19.0 but fp32 spills;
# 8: 21.4). `python tools/aot_compile.py --only int4 --sweep-warps 2,4,8`.
NUM_WARPS = 4
PER_WORD: tl.constexpr = tl.constexpr(int4.PER_WORD)
HALF_RANGE: tl.constexpr = tl.constexpr(int4.HALF_RANGE)
# v + (1.5 * 2^23 + 8), |v| <= 8: fp32's ulp there is 1, so the add rounds v to an integer, ties to
# even (8 and 1.5 * 2^23 are even: same parity), and the sum's low 4 bits are round(v) + 8.
RINT_PLUS_OFFSET: tl.constexpr = tl.constexpr(12582912.0 + int4.OFFSET)
RINT_BITS = 0x4B400000  # the bits of 1.5 * 2^23
# sum over i of RINT_BITS << 4i, wrapped to int32
WORD_BIAS: tl.constexpr = tl.constexpr(
    (sum(RINT_BITS << 4 * i for i in range(int4.PER_WORD)) + (1 << 31)) % (1 << 32) - (1 << 31))
# Below TINY a group scale's reciprocal (or the residual of its quotients) could leave fp32's normal
# range; such groups (amax < ~7.5 * 2^-90) are divided after multiplying values and scale by 2^64
# (exact: same quotient).
TINY: tl.constexpr = tl.constexpr(2.0 ** -90)
LIFT: tl.constexpr = tl.constexpr(2.0 ** 64)


@kernel
def load_f32(ptrs, mask, INTERPRET: tl.constexpr):
    """Load as fp32. The interpreter's bf16 -> fp32 cast mangles subnormals: it widens the bits instead."""
    v = tl.load(ptrs, mask=mask, other=0.0)
    if INTERPRET:
        if v.dtype == tl.bfloat16:
            return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return v.to(tl.float32)


@kernel
def round_to(v, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 -> the nearest `dtype` value (ties to even), kept in fp32; subnormals too (the interpreter's
    bf16 cast mangles them, so bf16 is rounded on the bits there)."""
    if INTERPRET:
        if dtype == tl.bfloat16:
            return round_to_bf16_grid(v)
    return cast_rne(v, dtype, INTERPRET).to(tl.float32)


@kernel
def store_rne(ptrs, v, mask, INTERPRET: tl.constexpr):
    """Store fp32 `v` as the pointer's type, rounded to nearest even, subnormals included."""
    dtype: tl.constexpr = ptrs.dtype.element_ty
    if INTERPRET:
        if dtype == tl.bfloat16:
            bits = (round_to_bf16_grid(v).to(tl.uint32, bitcast=True) >> 16).to(tl.uint16)
            tl.store(ptrs, bits.to(tl.bfloat16, bitcast=True), mask=mask)
            return
    tl.store(ptrs, cast_rne(v, dtype, INTERPRET), mask=mask)


@kernel
def quant_int4_kernel(
    x_ptr, p_ptr, s_ptr,
    M, N,
    stride_xe, stride_xm, stride_xn,
    stride_pe, stride_pm,
    stride_se, stride_sm,
    EPS: tl.constexpr, GROUP: tl.constexpr, ROUND_QUOTIENT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    NG: tl.constexpr = BLOCK_N // GROUP
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    # Ragged edges are masked; whole groups only (N % GROUP == 0), masked lanes read 0.
    pid_e, pid_m, pid_n, rows, cols, mask = tile_coords(M, N, BLOCK_M, BLOCK_N)
    x = load_f32(x_ptr + pid_e * stride_xe + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask, INTERPRET)
    x3 = tl.reshape(x, (BLOCK_M, NG, GROUP))
    # One reduction per group: its scale and, through NaN propagation, whether it is finite (a NaN/Inf
    # group gets a non-finite scale and the wrapper raises).
    amax = amax_nan(tl.abs(x3), 2, INTERPRET)
    # s = D(amax / 7.5), eps(D) for 0: exact in fp32 after the cast.
    s = round_to(tl.math.div_rn(amax, HALF_RANGE), dtype, INTERPRET)
    s = tl.where(s == 0.0, EPS, s)
    lift = tl.where(s < TINY, LIFT, 1.0)
    d = s * lift
    r = tl.math.div_rn(1.0, d)
    # x / s rounded once (IEEE), as compressed-tensors divides: Markstein's correction of q0 = x * r
    # (r = 1 / d rounded once; the residual x - q0 * d is exact), correctly rounded while r and the
    # residual stay normal, which the lift ensures for every |x / s| >= 2^-2 (smaller ones round to 0
    # whatever their last bit). quant_nvfp4's `divide_by`, with -d per group: no negation per element.
    xl = x3 * lift[:, :, None]
    q0 = xl * r[:, :, None]
    v = tl.fma(tl.fma(q0, -d[:, :, None], xl), r[:, :, None], q0)
    if ROUND_QUOTIENT:
        v = round_to(v, dtype, INTERPRET)
    v = tl.minimum(tl.maximum(v, -8.0), 7.0)
    # The float's bits are RINT_BITS + round(v) + 8; summed shifted (wrapping), they make the word of
    # nibbles round(v) + 8 (element 8j + i in bits 4i..4i+3 of word j) plus a constant, taken off once.
    bits = (v + RINT_PLUS_OFFSET).to(tl.int32, bitcast=True)
    shifts = tl.arange(0, PER_WORD) * 4
    words = tl.sum(tl.reshape(bits, (BLOCK_M, BLOCK_N // PER_WORD, PER_WORD)) << shifts[None, None, :], axis=2)
    words = words - WORD_BIAS
    pcols = pid_n * (BLOCK_N // PER_WORD) + tl.arange(0, BLOCK_N // PER_WORD)
    tl.store(p_ptr + pid_e * stride_pe + rows[:, None] * stride_pm + pcols[None, :], words,
             mask=(rows[:, None] < M) & (pcols[None, :] < N // PER_WORD))
    gcols = pid_n * NG + tl.arange(0, NG)
    store_rne(s_ptr + pid_e * stride_se + rows[:, None] * stride_sm + gcols[None, :], s,
             (rows[:, None] < M) & (gcols[None, :] < N // GROUP), INTERPRET)


@kernel
def dequant_int4_kernel(
    p_ptr, s_ptr, out_ptr,
    M, N,
    stride_pe, stride_pm, stride_pn,
    stride_se, stride_sm, stride_sn,
    stride_oe, stride_om,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    NG: tl.constexpr = BLOCK_N // GROUP
    pid_e, pid_m, pid_n, rows, cols, mask = tile_coords(M, N, BLOCK_M, BLOCK_N)
    rmask = rows[:, None] < M
    pcols = pid_n * (BLOCK_N // PER_WORD) + tl.arange(0, BLOCK_N // PER_WORD)
    words = tl.load(p_ptr + pid_e * stride_pe + rows[:, None] * stride_pm + pcols[None, :] * stride_pn,
                    mask=rmask & (pcols[None, :] < N // PER_WORD), other=0)
    shifts = tl.arange(0, PER_WORD) * 4
    q = ((words[:, :, None] >> shifts[None, None, :]) & 0xF) - 8
    q3 = tl.reshape(q.to(tl.float32), (BLOCK_M, NG, GROUP))
    gcols = pid_n * NG + tl.arange(0, NG)
    s = load_f32(s_ptr + pid_e * stride_se + rows[:, None] * stride_sm + gcols[None, :] * stride_sn,
                 rmask & (gcols[None, :] < N // GROUP), INTERPRET)
    out = tl.reshape(q3 * s[:, :, None], (BLOCK_M, BLOCK_N))
    store_rne(out_ptr + pid_e * stride_oe + rows[:, None] * stride_om + cols[None, :], out, mask, INTERPRET)


def quant_int4(
    x: torch.Tensor,
    *,
    group_size: int = int4.GROUP_SIZE,
    rule: str = "ct",
    num_warps: int = NUM_WARPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `x` ([M, N] or [E, M, N], bf16/fp16/fp32, N % group_size == 0) to symmetric int4.

    Returns `(packed, scale)`: int32 `[..., M, N/8]` (compressed-tensors `weight_packed`) and the group
    scales in x's dtype `[..., M, N/group_size]` (`weight_scale`). `rule` "ct" (fp32 quotient: what
    compressed-tensors computes on CUDA) or "ct-cpu" (quotient in x's dtype, its CPU path); see
    fp8norm.kernels.numerics.int4.
    """
    g, round_quotient = int4.check_quant_args(x, group_size, rule)
    packed = torch.empty(int4.packed_shape(tuple(x.shape)), dtype=torch.int32, device=x.device)
    scale = torch.empty(int4.scale_shape(tuple(x.shape), g), dtype=x.dtype, device=x.device)
    if x.numel():
        x3, p3, s3 = as_3d(x), as_3d(packed), as_3d(scale)
        n_exp, m, n = x3.shape
        grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(m, BLOCK_M), n_exp)
        quant_int4_kernel[grid](
            x3, p3, s3,
            m, n,
            x3.stride(0), x3.stride(1), x3.stride(2),
            p3.stride(0), p3.stride(1),
            s3.stride(0), s3.stride(1),
            EPS=int4.scale_eps(x.dtype), GROUP=g, ROUND_QUOTIENT=round_quotient and x.dtype != torch.float32,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            num_warps=num_warps,
            **LAUNCH_OPTIONS,
        )
    int4.raise_if_nonfinite_groups(scale, g)
    return packed, scale


def dequant_int4(packed: torch.Tensor, scale: torch.Tensor, *, group_size: int = int4.GROUP_SIZE,
                 out_dtype: torch.dtype = torch.bfloat16, num_warps: int = NUM_WARPS) -> torch.Tensor:
    """`q * scale` per group for packed int32 `[M, N/8]` or `[E, M, N/8]`, as out_dtype (one rounding)."""
    g, n = int4.check_dequant_args(packed, scale, group_size, out_dtype)
    *lead, m, _ = packed.shape
    out = torch.empty((*lead, m, n), dtype=out_dtype, device=packed.device)
    if out.numel():
        launch_group_dequant(dequant_int4_kernel, packed, scale, out, block_m=BLOCK_M, block_n=BLOCK_N,
                             num_warps=num_warps, GROUP=g)
    return out
