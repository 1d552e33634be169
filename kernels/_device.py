"""Triton twins of fp8norm.kernels.numerics.fp8_block: the same formulas, for use inside kernels.

Each helper that casts takes the kernel's `INTERPRET` constexpr (see `_launch`): compiled for a GPU
the hardware casts round to nearest even and saturate (`cvt.rn.satfinite.e4m3x2.f32`,
`cvt.rn.bf16x2.f32`); the interpreter's casts do not, so under it the value is rounded onto the
target grid in fp32 first and the cast is then exact.
"""

import triton.language as tl

from ._launch import kernel

E4M3_MAX = tl.constexpr(448.0)


@kernel
def ceil_mantissa(sf, DROP_BITS: tl.constexpr):
    """Round positive fp32 `sf` up so its low DROP_BITS mantissa bits are zero (23: ue8m0, 16: bf16)."""
    LOW: tl.constexpr = (1 << DROP_BITS) - 1
    bits = sf.to(tl.int32, bitcast=True)
    bits = tl.where((bits & LOW) != 0, (bits | LOW) + 1, bits)
    return bits.to(tl.float32, bitcast=True)


@kernel
def round_to_e4m3_grid(v):
    """Round fp32 `v` (|v| <= 448) to the nearest e4m3 value, ties to even, staying in fp32.

    The interpreter's fp32->fp8 cast drops the carry when rounding crosses a power of two; values
    already on the grid cast exactly everywhere, so the kernel rounds here and then casts.
    Adding 1.5 * 2^(e+20) puts the grid step 2^(e-3) (2^-9 for subnormals) at the fp32 ulp, so
    the hardware's round-to-nearest-even does the rounding; subtracting it back is exact.
    """
    bits = v.to(tl.int32, bitcast=True)
    exp = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    magic = (((exp + 20 + 127) << 23) | 0x400000).to(tl.float32, bitcast=True)
    r = (v + magic) - magic
    # Values that round to zero keep their sign (-0.0 and tiny negatives cast to 0x80, like torch).
    sign = (bits >> 31) << 31
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@kernel
def to_e4m3(v, INTERPRET: tl.constexpr):
    """Saturating round-to-nearest-even cast of fp32 `v` to e4m3 (NaN stays NaN)."""
    if INTERPRET:
        v = tl.minimum(tl.maximum(v, -E4M3_MAX), E4M3_MAX)
        return round_to_e4m3_grid(v).to(tl.float8e4nv)
    return v.to(tl.float8e4nv)  # cvt.rn.satfinite.e4m3x2.f32


@kernel
def round_to_bf16_grid(v):
    """Round fp32 `v` to the nearest bfloat16, ties to even, staying in fp32; NaN stays NaN.

    The interpreter's fp32->bf16 cast truncates; GPUs round to nearest even. On-grid values cast
    exactly on both. Adding 0x7FFF to a NaN's bits would carry it into Inf or zero (a GPU NaN is
    0x7FFFFFFF, or 0x7FFFE000 from an f16 NaN), so a NaN only gets its quiet bit set: a payload in
    the low 16 bits alone (0x7F800001) would otherwise truncate to Inf.
    """
    bits = v.to(tl.int32, bitcast=True)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536  # -65536 == 0xFFFF0000
    return tl.where(v != v, bits | 0x400000, rounded).to(tl.float32, bitcast=True)


@kernel
def cast_rne(v, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 -> `dtype` with round-to-nearest-even on the GPU and in the interpreter alike.

    The interpreter's fp32 -> bf16 conversion also flushes bf16 subnormals to zero, so there the
    rounded value's top half is taken as the bf16 bits (a bf16 is the top half of its fp32)."""
    if INTERPRET:
        if dtype == tl.bfloat16:
            top = round_to_bf16_grid(v).to(tl.int32, bitcast=True) >> 16
            return top.to(tl.int16).to(tl.bfloat16, bitcast=True)
    return v.to(dtype)


@kernel
def widen_to_f32(x, INTERPRET: tl.constexpr):
    """bf16 / fp16 / fp32 -> fp32, exactly. The interpreter's bf16 -> fp32 conversion flushes bf16
    subnormals, so there the bf16 bits become the fp32's top half; GPUs convert exactly."""
    if INTERPRET:
        if x.dtype == tl.bfloat16:
            return (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@kernel
def max_nan(a, b):
    """max that returns NaN if either side is NaN (`max.NaN.f32`; plain tl.max drops NaN on GPUs)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@kernel
def amax_nan(ax, axis: tl.constexpr, INTERPRET: tl.constexpr):
    """Max of non-negative `ax` over `axis` (None: all), NaN if any element is NaN.

    The tile's one reduction on the GPU: it gives the scale and, by `not (amax < inf)`, whether the
    tile holds NaN or Inf. The interpreter reduces max with numpy's nanmax (NaN skipped) and a user
    combine function one element at a time, so there a second, fast reduction finds the NaNs.
    `tl.max` is not used: it is a `triton.jit` function of triton's own, which only the interpreter
    of a process started with TRITON_INTERPRET=1 can call.
    """
    if INTERPRET:
        amax = tl.reduce(ax, axis, tl.standard._elementwise_max)
        has_nan = tl.reduce(tl.where(ax == ax, 0.0, 1.0), axis, tl.standard._elementwise_max) > 0.0
        return tl.where(has_nan, float("nan"), amax)
    return tl.reduce(ax, axis, max_nan)


@kernel
def tile_coords(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's tile on the grid (column tiles, row tiles, experts): its expert, row-tile and
    column-tile ids, row (int64) and column indices, and the mask of the ragged edges."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_e = tl.program_id(2).to(tl.int64)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    return pid_e, pid_m, pid_n, rows, cols, mask


@kernel
def load_e4m3_as_f32(ptr, mask, INTERPRET: tl.constexpr):
    """Load e4m3 values as fp32. Under the interpreter the NaN codes (0x7F, 0xFF) are decoded from
    the bits, since its cast reads them as +-480; compiled for a GPU the hardware cast gives NaN."""
    q = tl.load(ptr, mask=mask, other=0.0)
    if INTERPRET:
        is_nan = (q.to(tl.uint8, bitcast=True) & 0x7F) == 0x7F
        return tl.where(is_nan, float("nan"), q.to(tl.float32))
    return q.to(tl.float32)


@kernel
def not_finite(amax):
    """NaN or Inf (NaN fails every comparison)."""
    return ~(amax < float("inf"))
