"""Pure-torch twins of fp8norm.kernels.quant_int4 / dequant_int4 (bit-exact).

The formulas (compressed-tensors' W4A16 `pack-quantized`, as llm-compressor's model_free_ptq writes it)
are in fp8norm.kernels.numerics.int4. Like the other twins these walk each matrix in chunks of about
CHUNK_ELEMS elements (whole rows), so working memory stays bounded whatever the tensor size.
"""

from __future__ import annotations

import torch

from fp8norm.kernels.numerics import int4

from .common import ChunkBuffer, matrices, row_ranges

__all__ = ["quant_int4", "dequant_int4"]


def quant_int4(
    x: torch.Tensor,
    *,
    group_size: int = int4.GROUP_SIZE,
    rule: str = "ct",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of fp8norm.kernels.quant_int4: `(packed int32 [..., M, N/8], scale [..., M, N/group])`."""
    g, round_quotient = int4.check_quant_args(x, group_size, rule)
    *lead, m, n = x.shape
    packed = torch.empty(int4.packed_shape(tuple(x.shape)), dtype=torch.int32, device=x.device)
    scale = torch.empty(int4.scale_shape(tuple(x.shape), g), dtype=x.dtype, device=x.device)
    buf = ChunkBuffer(x.device)
    for x2, p2, s2 in matrices(x, packed, scale):
        for r0, r1 in row_ranges(m, n):
            rows = r1 - r0
            vg = buf.load(x2[r0:r1], 1, rows)[0].view(rows, n // g, g)
            amax = torch.maximum(vg.amax(2), vg.amin(2).neg_())  # NaN propagates
            s = int4.group_scale(amax, x.dtype)
            codes = int4.quantize_groups(vg, s, x.dtype, round_quotient)
            p2[r0:r1] = int4.pack_int4(codes.view(rows, n))
            s2[r0:r1] = s
    int4.raise_if_nonfinite_groups(scale, g)
    return packed, scale


def dequant_int4(
    packed: torch.Tensor,
    scale: torch.Tensor,
    *,
    group_size: int = int4.GROUP_SIZE,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Torch twin of fp8norm.kernels.dequant_int4: q * scale in fp32, rounded once to out_dtype."""
    g, n = int4.check_dequant_args(packed, scale, group_size, out_dtype)
    *lead, m, _ = packed.shape
    out = torch.empty((*lead, m, n), dtype=out_dtype, device=packed.device)
    for p2, s2, o2 in matrices(packed, scale, out):
        for r0, r1 in row_ranges(m, n):
            rows = r1 - r0
            q = int4.unpack_int4(p2[r0:r1]).float().view(rows, n // g, g)
            o2[r0:r1] = (q * s2[r0:r1].float().unsqueeze(2)).view(rows, n)
    return out
