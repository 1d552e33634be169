"""Pure-torch twins of fp8norm.kernels.quant_fp8_channel / dequant_fp8_channel (bit-exact).

The formulas are in fp8norm.kernels.numerics.fp8_channel. Chunks of whole rows keep working memory bounded.
"""

from __future__ import annotations

import torch

from fp8norm.kernels.numerics import fp8_block as nx
from fp8norm.kernels.numerics import fp8_channel as fc

from .common import ChunkBuffer, matrices, row_ranges, src_scale_rows

__all__ = ["quant_fp8_channel", "dequant_fp8_channel"]


def quant_fp8_channel(
    x: torch.Tensor,
    *,
    scale_fmt: str = "float",
    scale_dtype: torch.dtype = torch.float32,
    amax_floor: float = fc.AMAX_FLOOR,
    src_scale_inv: torch.Tensor | None = None,
    src_block_size=nx.DEFAULT_BLOCK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of fp8norm.kernels.quant_fp8_channel: `(q e4m3, scale [..., M, 1] in scale_dtype)`."""
    drop_bits, sf_max, src_sf, block_size = fc.check_quant_args(x, scale_fmt, scale_dtype, amax_floor, src_scale_inv,
                                                          src_block_size)
    *lead, m, n = x.shape
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(fc.scale_shape(tuple(x.shape)), dtype=scale_dtype, device=x.device)
    buf = ChunkBuffer(x.device)
    mats = (x, q, scale) + ((src_sf,) if src_sf is not None else ())
    for x2, q2, s2, *src in matrices(*mats):
        for r0, r1 in row_ranges(m, n):
            v = buf.load(x2[r0:r1], 1, r1 - r0)[0]
            if src:  # FP8 input: the dequantized value, as dequant_fp8_block computes it
                v.mul_(src_scale_rows(src[0], r0, r1, block_size, n))
            amax = torch.maximum(v.amax(1, keepdim=True), v.amin(1, keepdim=True).neg_()) if n else \
                torch.zeros((r1 - r0, 1), device=x.device)
            sf = nx.sf_from_amax(amax, amax_floor)
            if drop_bits:
                sf = nx.ceil_mantissa(sf, drop_bits)
            sf = sf.clamp_max(sf_max)
            q2[r0:r1] = v.mul_(torch.reciprocal(sf)).clamp_(-nx.E4M3_MAX, nx.E4M3_MAX)
            s2[r0:r1] = torch.where(torch.isfinite(amax), sf, torch.nan)
    fc.raise_if_nonfinite_rows(scale)
    return q, scale


def dequant_fp8_channel(q: torch.Tensor, scale: torch.Tensor, *,
                        out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Torch twin of fp8norm.kernels.dequant_fp8_channel: `float(q) * scale[row]`, cast to out_dtype."""
    sf = fc.check_dequant_args(q, scale, out_dtype)
    *lead, m, n = q.shape
    out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    buf = ChunkBuffer(q.device)
    for q2, s2, o2 in matrices(q, sf, out):
        for r0, r1 in row_ranges(m, n):
            o2[r0:r1] = buf.load(q2[r0:r1], 1, r1 - r0)[0].mul_(s2[r0:r1])
    return out
