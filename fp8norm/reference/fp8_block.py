"""Pure-torch twins of fp8norm.kernels.quant_fp8_block / dequant_fp8_block (bit-exact); the formulas
are in fp8norm.kernels.numerics.fp8_block."""

from __future__ import annotations

import torch

from fp8norm.kernels.numerics import fp8_block as nx
from fp8norm.kernels.numerics.args import check_dequant_args, check_quant_args, raise_if_nonfinite_tiles

from .common import ChunkBuffer, block_amax_cols, expand_cols, matrices, row_chunks

__all__ = ["quant_fp8_block", "dequant_fp8_block"]


def quant_fp8_block(
    x: torch.Tensor,
    *,
    block_size=nx.DEFAULT_BLOCK_SIZE,
    scale_fmt: str = "float",
    scale_dtype: torch.dtype = torch.float32,
    amax_floor: float = nx.DEFAULT_AMAX_FLOOR,
    scale_inv: torch.Tensor | None = None,
    x_scale_inv: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of fp8norm.kernels.quant_fp8_block (bit-exact)."""
    (bm, bn), given, x_sf = check_quant_args(x, block_size, scale_fmt, scale_dtype, amax_floor, scale_inv,
                                              x_scale_inv)
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    # Scales are built in fp32 (already rounded to what the stored dtype holds exactly).
    sf_all = given.clone() if given is not None else torch.empty(
        nx.scale_inv_shape(tuple(x.shape), (bm, bn)), dtype=torch.float32, device=x.device)
    buf = ChunkBuffer(x.device)
    xs_all = x_sf if x_sf is not None else sf_all  # placeholder when x is not FP8
    for x2, q2, s2, xs2 in matrices(x, q, sf_all, xs_all):
        m, n = x2.shape
        for b0, k, rows in row_chunks(m, n, bm):
            r0 = b0 * bm
            chunk = buf.load(x2[r0:r0 + k * rows], k, rows)
            if x_sf is not None:  # FP8 input: dequantize the chunk first, as the kernel does per tile
                chunk.mul_(expand_cols(xs2[b0:b0 + k], bn, n).unsqueeze(1))
            # amax and amin as two reductions: aminmax and abs() are ~10x slower here. NaN propagates.
            col_absmax = torch.maximum(chunk.amax(1), chunk.amin(1).neg_())
            tile_amax = block_amax_cols(col_absmax, bn)
            if given is None:
                sf = nx.round_scale(nx.sf_from_amax(tile_amax, amax_floor), scale_fmt, scale_dtype)
            else:
                sf = s2[b0:b0 + k]
            inv = torch.reciprocal(sf)
            chunk.mul_(expand_cols(inv, bn, n).unsqueeze(1)).clamp_(-nx.E4M3_MAX, nx.E4M3_MAX)
            q2[r0:r0 + k * rows].copy_(chunk.view(k * rows, n))  # RNE cast, values in range
            s2[b0:b0 + k] = torch.where(torch.isfinite(tile_amax), sf, torch.nan)
    raise_if_nonfinite_tiles(sf_all)
    if given is not None:
        return q, scale_inv
    return q, sf_all.to(scale_dtype)


def dequant_fp8_block(
    q: torch.Tensor,
    scale_inv: torch.Tensor,
    *,
    block_size=nx.DEFAULT_BLOCK_SIZE,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Torch twin of fp8norm.kernels.dequant_fp8_block (bit-exact): `q * scale_inv` per tile."""
    (bm, bn), sf_all = check_dequant_args(q, scale_inv, block_size, out_dtype)
    out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    buf = ChunkBuffer(q.device)
    for q2, s2, o2 in matrices(q, sf_all, out):
        m, n = q2.shape
        for b0, k, rows in row_chunks(m, n, bm):
            r0 = b0 * bm
            chunk = buf.load(q2[r0:r0 + k * rows], k, rows)
            chunk.mul_(expand_cols(s2[b0:b0 + k], bn, n).unsqueeze(1))
            o2[r0:r0 + k * rows].copy_(chunk.view(k * rows, n))
    return out
