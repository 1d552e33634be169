"""The numeric rules of block FP8, one short function per formula (DeepSeek/DeepGEMM convention).

Shared by the torch twins and used by the tests' expectations of the Triton kernels. Every function
works on fp32 tensors; bit tricks act on the fp32 encoding so results are exact, not log2-rounded.
"""

from __future__ import annotations

import math

import torch

from .block_grid import DEFAULT_AMAX_FLOOR, DEFAULT_BLOCK_SIZE, ceil_div, scale_inv_shape  # noqa: F401

E4M3_MAX = 448.0

SCALE_FMTS = ("float", "ue8m0")
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float8_e8m0fnu)
INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# fp32 mantissa bits dropped by rounding a scale up: all 23 for a power of two (ue8m0), 16 for bf16.
UE8M0_DROP_BITS = 23
BF16_DROP_BITS = 16


def sf_from_amax(amax: torch.Tensor, amax_floor: float) -> torch.Tensor:
    """sf = max(amax, floor) / 448, in fp32 (the floor keeps all-zero tiles finite)."""
    return amax.float().clamp_min(amax_floor) / E4M3_MAX


def ceil_mantissa(sf: torch.Tensor, drop_bits: int) -> torch.Tensor:
    """Round positive fp32 `sf` UP to a value with its low `drop_bits` mantissa bits zero.

    drop_bits=23 is DeepGEMM's `ceil_to_ue8m0` (2^ceil(log2 sf)) computed exactly on the bits;
    drop_bits=16 rounds up to the nearest bfloat16.
    """
    low = (1 << drop_bits) - 1
    bits = sf.float().contiguous().view(torch.int32)
    bits = torch.where((bits & low) != 0, (bits | low) + 1, bits)
    return bits.view(torch.float32)


def ceil_to_ue8m0(sf: torch.Tensor) -> torch.Tensor:
    return ceil_mantissa(sf, UE8M0_DROP_BITS)


def ceil_to_bf16(sf: torch.Tensor) -> torch.Tensor:
    return ceil_mantissa(sf, BF16_DROP_BITS)


def scale_round_bits(scale_fmt: str, scale_dtype: torch.dtype) -> int:
    """Mantissa bits to round away so the stored scale is exactly the one used to quantize.

    ue8m0 rounds to a power of two (representable in every scale dtype); a float scale stored in
    bf16 is rounded up to bf16 first (up, so the tile max never saturates); fp32 needs nothing.
    """
    if scale_fmt == "ue8m0":
        return UE8M0_DROP_BITS
    if scale_dtype == torch.bfloat16:
        return BF16_DROP_BITS
    return 0


def round_scale(sf: torch.Tensor, scale_fmt: str, scale_dtype: torch.dtype) -> torch.Tensor:
    drop_bits = scale_round_bits(scale_fmt, scale_dtype)
    return ceil_mantissa(sf, drop_bits) if drop_bits else sf


def saturate_e4m3(v: torch.Tensor) -> torch.Tensor:
    """Saturating round-to-nearest-even cast: eager `.to(float8_e4m3fn)` does not clamp."""
    return v.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def is_power_of_two(t: torch.Tensor) -> bool:
    """Every element an exact positive power of two (what `scale_fmt: ue8m0` promises)."""
    f = t.float()
    mant, _ = torch.frexp(f)
    return bool(((f > 0) & (mant == 0.5)).all())


def e4m3_grid_step(v: float) -> float:
    """Distance between e4m3 neighbours around |v| (2^-9 in the subnormal range)."""
    exp = max(math.frexp(abs(v))[1] - 1, -6) if v else -6
    return 2.0 ** (exp - 3)
