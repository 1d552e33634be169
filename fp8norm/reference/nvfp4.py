"""Pure-torch twins of fp8norm.kernels.quant_nvfp4 / dequant_nvfp4 (bit-exact), and nvfp4_amax.

The formulas (ModelOpt's `NVFP4QTensor`, and where fp8norm departs from it) are in
fp8norm.kernels.numerics.nvfp4. Like the block-FP8 twins these walk each matrix in chunks of about
CHUNK_ELEMS elements (whole rows), so working memory stays bounded whatever the tensor size.
"""

from __future__ import annotations

import torch

from fp8norm.kernels.numerics import nvfp4 as n4
from fp8norm.kernels.numerics.args import check_amax_args

from .common import ChunkBuffer, block_amax_cols, matrices, row_chunks, row_ranges, src_scale_rows

__all__ = ["quant_nvfp4", "dequant_nvfp4", "nvfp4_amax"]


def amax_per_expert(x: torch.Tensor, src_sf: torch.Tensor | None, src_block_size) -> torch.Tensor:
    """max |value| of each matrix of x (already validated) as fp32 `[E]` (E = 1 for 2D); NaN propagates.

    For an FP8 x the value is x.float() * scale; max over tiles of (max|q| * scale) is the same number,
    since rounding the product is monotonic in |q|.
    """
    amaxes = []
    buf = ChunkBuffer(x.device)
    for mats in matrices(*((x,) if src_sf is None else (x, src_sf))):
        x2 = mats[0]
        m, n = x2.shape
        amax = torch.zeros((), dtype=torch.float32, device=x.device)
        if src_sf is None:
            for r0, r1 in row_ranges(m, n):
                part = x2[r0:r1]
                if part.numel():
                    # amax and amin: abs() would copy the chunk. Both propagate NaN.
                    amax = torch.maximum(amax, torch.maximum(part.amax(), part.amin().neg()).float())
        elif x2.numel():
            bm, bn = src_block_size
            for b0, k, rows in row_chunks(m, n, bm):
                chunk = buf.load(x2[b0 * bm:b0 * bm + k * rows], k, rows)
                col_absmax = torch.maximum(chunk.amax(1), chunk.amin(1).neg_())
                tile = block_amax_cols(col_absmax, bn) * mats[1][b0:b0 + k].abs()
                amax = torch.maximum(amax, tile.amax())
        amaxes.append(amax)
    if not amaxes:  # 3D with zero experts
        return torch.zeros(0, dtype=torch.float32, device=x.device)
    return torch.stack(amaxes)


def nvfp4_amax(x: torch.Tensor, *, src_scale_inv: torch.Tensor | None = None, src_block_size=(128, 128)):
    """fp32 amax that quant_nvfp4 computes when no global_amax is given: 0-dim for 2D x, `[E]` for 3D.

    For an FP8 x (with its block scales `src_scale_inv`) it is the amax of the dequantized values.
    Pass the max over fused tensors (q/k/v, gate/up) as quant_nvfp4's global_amax to share scale_2.
    Raises ValueError for NaN/Inf input.
    """
    src_sf, block_size = check_amax_args(x, src_scale_inv, src_block_size)
    amax = amax_per_expert(x, src_sf, block_size)
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch twin of fp8norm.kernels.quant_nvfp4 (bit-exact): (packed, weight_scale, weight_scale_2)."""
    g, block_size, src_sf, ga = n4.check_quant_args(x, global_amax, src_scale_inv, src_block_size, group_size)
    if ga is None:
        ga = amax_per_expert(x, src_sf, block_size)
        n4.raise_if_nonfinite_amax(ga if x.dim() == 3 else ga.reshape(()))
    scale_2 = n4.scale_2_for(x, ga)
    *lead, m, n = x.shape
    packed = torch.empty((*lead, m, n // 2), dtype=torch.uint8, device=x.device)
    weight_scale = torch.empty((*lead, m, n // g), dtype=torch.float8_e4m3fn, device=x.device)
    s2_all = scale_2.reshape(-1)
    buf = ChunkBuffer(x.device)
    mats = (x, packed, weight_scale) + ((src_sf,) if src_sf is not None else ())
    for e, (x2, p2, w2, *src) in enumerate(matrices(*mats)):
        s2 = s2_all[e]
        for r0, r1 in row_ranges(m, n):
            rows = r1 - r0
            v = buf.load(x2[r0:r1], 1, rows)[0]
            if src:  # FP8 input: the dequantized value, as dequant_fp8_block computes it
                v.mul_(src_scale_rows(src[0], r0, r1, block_size, n))
            vg = v.view(rows, n // g, g)
            gamax = torch.maximum(vg.amax(2), vg.amin(2).neg_())  # NaN propagates
            s_q = n4.group_scale_e4m3(gamax, s2)
            d = s_q.float().mul_(s2).unsqueeze(2)
            q = torch.where(d == 0, 0.0, vg / d)
            p2[r0:r1] = n4.pack_codes(n4.e2m1_codes(q).view(rows, n))
            w2[r0:r1] = torch.where(torch.isfinite(gamax), s_q.float(), torch.nan)  # NaN marks bad groups
    n4.raise_if_nonfinite_groups(weight_scale)
    return packed, weight_scale, scale_2


def dequant_nvfp4(
    packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_scale_2: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Torch twin of fp8norm.kernels.dequant_nvfp4 (bit-exact): e2m1 * (float(weight_scale) * scale_2)."""
    g, s2_all = n4.check_dequant_args(packed, weight_scale, weight_scale_2, out_dtype)
    *lead, m, half = packed.shape
    n = 2 * half
    out = torch.empty((*lead, m, n), dtype=out_dtype, device=packed.device)
    table = n4.e2m1_table(packed.device)
    for e, (p2, w2, o2) in enumerate(matrices(packed, weight_scale, out)):
        for r0, r1 in row_ranges(m, n):
            rows = r1 - r0
            v = table[n4.unpack_codes(p2[r0:r1]).long()].view(rows, n // g, g)
            d = w2[r0:r1].float().mul_(s2_all[e]).unsqueeze(2)
            o2[r0:r1] = (v * d).view(rows, n)
    return out


# Public names of the row helpers, for the other twins' modules.
