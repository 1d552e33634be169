"""Triton twins of fp8norm.numerics: the same formulas, for use inside kernels."""

import os

import triton
import triton.language as tl

E4M3_MAX = tl.constexpr(448.0)


@triton.jit
def ceil_mantissa(sf, DROP_BITS: tl.constexpr):
    """Round positive fp32 `sf` up so its low DROP_BITS mantissa bits are zero (23: ue8m0, 16: bf16)."""
    LOW: tl.constexpr = (1 << DROP_BITS) - 1
    bits = sf.to(tl.int32, bitcast=True)
    bits = tl.where((bits & LOW) != 0, (bits | LOW) + 1, bits)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
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


@triton.jit
def saturate_e4m3(v):
    """Saturating round-to-nearest-even cast to e4m3 (clamp, round on the grid, exact cast)."""
    v = tl.minimum(tl.maximum(v, -E4M3_MAX), E4M3_MAX)
    return round_to_e4m3_grid(v).to(tl.float8e4nv)


@triton.jit
def round_to_bf16_grid(v):
    """Round fp32 `v` to the nearest bfloat16, ties to even, staying in fp32 (finite inputs).

    The interpreter's fp32->bf16 cast truncates; GPUs round to nearest even. On-grid values cast
    exactly on both.
    """
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536  # -65536 == 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def cast_rne(v, dtype: tl.constexpr):
    """fp32 -> `dtype` with round-to-nearest-even on the GPU and in the interpreter alike."""
    if dtype == tl.bfloat16:
        v = round_to_bf16_grid(v)
    return v.to(dtype)


@triton.jit
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


# Decided when the kernels are decorated, like triton.jit itself (see fp8norm.kernels).
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))


@triton.jit
def load_e4m3_as_f32(ptr, mask):
    """Load e4m3 values as fp32. Under the interpreter the NaN codes (0x7F, 0xFF) are decoded from
    the bits, since its cast reads them as +-480; compiled for a GPU the hardware cast gives NaN."""
    q = tl.load(ptr, mask=mask, other=0.0)
    if INTERPRETED:
        is_nan = (q.to(tl.uint8, bitcast=True) & 0x7F) == 0x7F
        return tl.where(is_nan, float("nan"), q.to(tl.float32))
    return q.to(tl.float32)
