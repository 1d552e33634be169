"""Pure-torch twins of fp8norm.kernels.quant_mx / dequant_mx (bit-exact).

The formulas (OCP Microscaling v1.0 and the shared-scale rules rceil, ocp, ct) are
in fp8norm.kernels.numerics.mx. Like the other twins these walk each matrix in chunks of about CHUNK_ELEMS
elements (whole rows), so working memory stays bounded whatever the tensor size.
"""

from __future__ import annotations

import torch

from fp8norm.kernels.numerics import mx

from .common import ChunkBuffer, matrices, row_ranges, src_scale_rows

__all__ = ["quant_mx", "dequant_mx"]


def quant_mx(
    x: torch.Tensor,
    *,
    fmt: str = "mxfp8",
    rule: str = mx.DEFAULT_RULE,
    src_scale_inv: torch.Tensor | None = None,
    src_block_size=(128, 128),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of fp8norm.kernels.quant_mx: `(elements, scale codes uint8 [..., M, N/32])`."""
    f, _, src_sf, block_size = mx.check_quant_args(x, fmt, rule, src_scale_inv, src_block_size)
    *lead, m, n = x.shape
    elem_dtype = torch.float8_e4m3fn if f.elem_bits == 8 else torch.uint8
    out = torch.empty(mx.packed_shape(tuple(x.shape), f), dtype=elem_dtype, device=x.device)
    scale = torch.empty(mx.scale_shape(tuple(x.shape)), dtype=torch.uint8, device=x.device)
    buf = ChunkBuffer(x.device)
    mats = (x, out, scale) + ((src_sf,) if src_sf is not None else ())
    for x2, o2, s2, *src in matrices(*mats):
        for r0, r1 in row_ranges(m, n):
            rows = r1 - r0
            v = buf.load(x2[r0:r1], 1, rows)[0]
            if src:  # FP8 input: the dequantized value, as dequant_fp8_block computes it
                v.mul_(src_scale_rows(src[0], r0, r1, block_size, n))
            vg = v.view(rows, n // mx.MX_BLOCK, mx.MX_BLOCK)
            amax = torch.maximum(vg.amax(2), vg.amin(2).neg_())  # NaN propagates
            codes = mx.scale_codes(amax, f, rule)
            vg.mul_(mx.inverse_scale(codes).unsqueeze(2))
            o2[r0:r1] = mx.encode_elements(v, f)
            s2[r0:r1] = codes.to(torch.uint8)
    mx.raise_if_nan_scales(scale)
    return out, scale


def dequant_mx(
    stored: torch.Tensor,
    scale: torch.Tensor,
    *,
    fmt: str = "mxfp8",
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Torch twin of fp8norm.kernels.dequant_mx: element * 2^(code - 127), cast to out_dtype."""
    f, n = mx.check_dequant_args(stored, scale, fmt, out_dtype)
    *lead, m, _ = stored.shape
    out = torch.empty((*lead, m, n), dtype=out_dtype, device=stored.device)
    for p2, s2, o2 in matrices(stored, scale, out):
        for r0, r1 in row_ranges(m, n):
            rows = r1 - r0
            v = mx.decode_elements(p2[r0:r1], f).view(rows, n // mx.MX_BLOCK, mx.MX_BLOCK)
            o2[r0:r1] = (v * mx.scale_value(s2[r0:r1]).unsqueeze(2)).view(rows, n)
    return out
