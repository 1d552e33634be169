"""Per-channel FP8 (compressed-tensors FP8_DYNAMIC weights): one fp32 scale per output row.

    sf[..., m, 0] = max(max_n |x[..., m, n]|, amax_floor) / 448   (rounded up to a power of two for
                    ue8m0, or to a bfloat16 value for a bfloat16 scale)
    q = saturate_e4m3(x * (1 / sf))                              round to nearest even
    value = float(q) * sf

the block-FP8 formulas of fp8norm.kernels.numerics.fp8_block with the tile widened to the whole row. The scale is stored
as `weight_scale` float32 [..., M, 1] (compressed-tensors `strategy: channel`, read by vLLM and
transformers); activations are quantized per token at run time by the engine.
transformers holds `weight_scale` in the model's dtype (bf16) and vLLM in fp32: `fp8norm quantize
--scheme fp8-channel` rounds each scale up to a bfloat16 value (stored as fp32), so both dequantize to
exactly fp8norm's values (up: the row max never saturates).
"""

from __future__ import annotations

import torch

from . import fp8_block as nx
from .args import check_amax_args, check_e4m3_operand

SCALE_FMTS = nx.SCALE_FMTS


def scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (*shape[:-1], 1)


SCALE_DTYPES = (torch.float32, torch.bfloat16)


def check_quant_args(x, scale_fmt, scale_dtype, amax_floor, src_scale_inv, src_block_size):
    """Validate quant_fp8_channel's arguments (kernel and twin alike).

    Returns (scale drop bits, src scales as contiguous fp32 or None, src_block_size)."""
    src_sf, src_block_size = check_amax_args(x, src_scale_inv, src_block_size)
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt must be one of {SCALE_FMTS}, got {scale_fmt!r}")
    if scale_dtype not in SCALE_DTYPES:
        raise TypeError(f"scale_dtype must be float32 or bfloat16, got {scale_dtype}")
    if not amax_floor > 0:
        raise ValueError(f"amax_floor must be > 0 (zero rows would divide by zero), got {amax_floor}")
    return nx.scale_round_bits(scale_fmt, scale_dtype), src_sf, src_block_size


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
