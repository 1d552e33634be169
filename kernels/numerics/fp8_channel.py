"""Per-channel FP8 (compressed-tensors FP8_DYNAMIC weights): one fp32 scale per output row.

    sf[..., m, 0] = max(max_n |x[..., m, n]|, amax_floor) / 448   (rounded up to a power of two for
                    ue8m0, or to a bfloat16 value for a bfloat16 scale; at most max_scale)
    q = saturate_e4m3(x * (1 / sf))                              round to nearest even
    value = float(q) * sf

the block-FP8 formulas of fp8norm.kernels.numerics.fp8_block with the tile widened to the whole row. The scale is stored
as `weight_scale` float32 [..., M, 1] (compressed-tensors `strategy: channel`, read by vLLM and
transformers); activations are quantized per token at run time by the engine.
transformers holds `weight_scale` in the model's dtype (bf16) and vLLM in fp32: `fp8norm quantize
--scheme fp8-channel` rounds each scale up to a bfloat16 value (stored as fp32), so both dequantize to
exactly fp8norm's values (up: the row max never saturates).

No amax floor beyond what keeps the arithmetic finite (compressed-tensors has none): the default and
least `amax_floor` is AMAX_FLOOR = 448 * 2^-126, so the smallest scale is 2^-126, fp32's smallest normal,
whose inverse 2^126 is finite: an all-zero row gets that scale and zeros, and only rows with amax below
5.3e-36 (none in real weights) get a scale above amax / 448. And no scale above max_scale: 448 * sf
stays at most bfloat16's max (3.3895e38), so no finite input dequantizes to inf in fp32 or bf16 (a
bf16-max row's bf16 scale, rounded up, would give 448 * sf halfway past it, which rounds to inf); rows
with amax above 448 * max_scale (bf16's top binade: 3.37e38 with bf16 scales, 2.98e38 with ue8m0)
saturate their largest elements.
"""

from __future__ import annotations

import torch

from . import fp8_block as nx
from .args import check_amax_args, check_e4m3_operand

SCALE_FMTS = nx.SCALE_FMTS
AMAX_FLOOR = nx.E4M3_MAX * 2.0 ** -126  # the default and least amax_floor: scale >= 2^-126 (module docstring)
BF16_MAX = torch.finfo(torch.bfloat16).max


def max_scale(drop_bits: int) -> float:
    """The largest scale on the grid a rounding to `drop_bits` leaves (fp32, bf16, powers of two) with
    448 * scale <= bfloat16's max: every dequantized value finite in fp32 and bf16."""
    sf = torch.tensor(BF16_MAX / nx.E4M3_MAX, dtype=torch.float64).float()
    if sf.double() * nx.E4M3_MAX > BF16_MAX:  # rounded up into fp32
        sf = torch.nextafter(sf, torch.zeros(()))
    return float((sf.view(torch.int32) & ~((1 << drop_bits) - 1)).view(torch.float32))


def scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (*shape[:-1], 1)


SCALE_DTYPES = (torch.float32, torch.bfloat16)


def check_quant_args(x, scale_fmt, scale_dtype, amax_floor, src_scale_inv, src_block_size):
    """Validate quant_fp8_channel's arguments (kernel and twin alike).

    Returns (scale drop bits, max_scale(drop bits), src scales as contiguous fp32 or None, src_block_size)."""
    src_sf, src_block_size = check_amax_args(x, src_scale_inv, src_block_size)
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt must be one of {SCALE_FMTS}, got {scale_fmt!r}")
    if scale_dtype not in SCALE_DTYPES:
        raise TypeError(f"scale_dtype must be float32 or bfloat16, got {scale_dtype}")
    if not amax_floor >= AMAX_FLOOR:
        raise ValueError(f"amax_floor must be >= {AMAX_FLOOR:.4g} (448 x fp32's smallest normal: smaller scales are "
                         f"subnormal, their inverses overflow), got {amax_floor}")
    drop_bits = nx.scale_round_bits(scale_fmt, scale_dtype)
    return drop_bits, max_scale(drop_bits), src_sf, src_block_size


def check_dequant_args(q, scale, out_dtype) -> torch.Tensor:
    """Validate dequant_fp8_channel's arguments; returns the scale as contiguous fp32."""
    check_e4m3_operand(q, out_dtype)
    if tuple(scale.shape) != scale_shape(tuple(q.shape)):
        raise ValueError(f"scale has shape {tuple(scale.shape)}, expected {scale_shape(tuple(q.shape))} "
                         f"for q {tuple(q.shape)}")
    if scale.device != q.device:
        raise ValueError(f"scale is on {scale.device}, q on {q.device}")
    return scale.float().contiguous()


def raise_if_nonfinite_rows(scale: torch.Tensor) -> None:
    """The kernels mark a row holding NaN/Inf with a NaN scale; name the first such row."""
    bad = ~torch.isfinite(scale.float())
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0].tolist()[:-1])
        raise ValueError(f"input has non-finite values (NaN or Inf) in {int(bad.sum())} row(s), first at row "
                         f"{first}; refusing to quantize")
