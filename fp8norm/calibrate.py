"""Calibration: how each tile's clipping threshold `c` is chosen before `sf = max(c, floor) / 448`.

  max         c = max|x|                          (default; bit-identical to the plain kernel)
  rms         c = k * rms(x)                      (--rms-factor k, default 3.0; outliers saturate)
  percentile  c = p-th percentile of |x|          (--percentile p, default 99.9, nearest rank)
  mse         c = a * max|x| for the a in a grid of --mse-grid factors from 1 down to 1/2 that gives
              the least squared quantization error (a = 1 first, so mse is never worse than max)

Activation statistics (mean square of each input channel, from `fp8norm collect-stats`) weight
the rms and the squared error: sum_j w_j x_ij^2, so scales fit the channels that matter most.

Every mode works on the whole tile grid at once (a padded fp32 view [E, tm, tn, bm*bn], NaN in the
padding); the only Python loops are over experts of a 3D tensor and over the mse grid. The scale is
then rounded as it will be stored (ue8m0: up to a power of two; bf16: up to bf16) before the
saturating cast, which is the kernel's given-scale path.
"""

from __future__ import annotations

import math

import torch

from . import dispatch
from .calib_settings import CalibSettings  # its home: planning imports no torch
from .kernels.numerics import fp8_block as nx



def tile_view(x2: torch.Tensor, block_size) -> torch.Tensor:
    """[M, N] -> fp32 [tm, tn, bm*bn]: each tile's elements in a row, NaN where the tile is ragged."""
    bm, bn = block_size
    m, n = x2.shape
    tm, tn = nx.ceil_div(m, bm), nx.ceil_div(n, bn)
    padded = torch.full((tm * bm, tn * bn), torch.nan, dtype=torch.float32, device=x2.device)
    padded[:m, :n] = x2
    return padded.view(tm, bm, tn, bn).permute(0, 2, 1, 3).reshape(tm, tn, bm * bn)


def column_weight_tiles(w: torch.Tensor, m: int, block_size) -> torch.Tensor:
    """Per-input-channel weights [N] laid out like tile_view of an [m, N] tensor (0 in the padding)."""
    bm, bn = block_size
    n = w.numel()
    tm, tn = nx.ceil_div(m, bm), nx.ceil_div(n, bn)
    padded = torch.zeros(tn * bn, dtype=torch.float32, device=w.device)
    padded[:n] = w.float()
    cols = padded.view(1, tn, 1, bn).expand(tm, tn, bm, bn)
    rows_valid = (torch.arange(tm * bm, device=w.device) < m).view(tm, 1, bm, 1)
    return (cols * rows_valid).reshape(tm, tn, bm * bn)


def tile_amax(t: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(t.abs(), nan=-1.0).amax(-1)


def tile_rms(t: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    valid = ~torch.isnan(t)
    sq = torch.where(valid, t, 0.0).square()
    weight = valid.float() if w is None else w * valid
    total = weight.sum(-1)
    # a tile whose channels all have zero weight falls back to the plain rms
    plain = sq.sum(-1) / valid.sum(-1)
    return torch.where(total > 0, (sq * weight).sum(-1) / total.clamp_min(1e-30), plain).sqrt()


def tile_percentile(t: torch.Tensor, p: float) -> torch.Tensor:
    """Nearest-rank p-th percentile of |x| over each tile's valid elements."""
    a = torch.nan_to_num(t.abs(), nan=-1.0)  # padding sorts first
    s, _ = a.sort(-1)
    n_valid = (~torch.isnan(t)).sum(-1, keepdim=True)
    rank = torch.ceil(n_valid * (p / 100.0)).long().clamp(1) - 1
    idx = (t.shape[-1] - n_valid) + rank
    return s.gather(-1, idx).squeeze(-1)


def fake_quant(t: torch.Tensor, sf: torch.Tensor) -> torch.Tensor:
    """x -> saturate_e4m3(x / sf) * sf per tile (the dequantized value the checkpoint will hold)."""
    inv = torch.reciprocal(sf).unsqueeze(-1)
    return nx.saturate_e4m3(t * inv).float() * sf.unsqueeze(-1)


def stored_scale(c: torch.Tensor, amax_floor: float, scale_fmt: str, scale_dtype: torch.dtype) -> torch.Tensor:
    """sf from a clipping threshold, rounded as it will be stored (fp32 values)."""
    return nx.round_scale(nx.sf_from_amax(c, amax_floor), scale_fmt, scale_dtype)


def tile_mse_threshold(t, w, amax, grid, amax_floor, scale_fmt, scale_dtype) -> torch.Tensor:
    valid = ~torch.isnan(t)
    x = torch.where(valid, t, 0.0)
    weight = valid.float() if w is None else w * valid
    best_err = torch.full_like(amax, math.inf)
    best_c = amax.clone()
    for i in range(grid):
        alpha = 1.0 - 0.5 * i / max(grid - 1, 1)
        c = amax * alpha
        err = ((fake_quant(x, stored_scale(c, amax_floor, scale_fmt, scale_dtype)) - x).square() * weight).sum(-1)
        better = err < best_err  # strict: on ties the larger threshold (seen first) stays
        best_err = torch.where(better, err, best_err)
        best_c = torch.where(better, c, best_c)
    return best_c


def tile_thresholds(x2: torch.Tensor, calib: CalibSettings, block_size, act_weights, amax_floor,
                    scale_fmt, scale_dtype) -> torch.Tensor:
    """Clipping threshold c per tile of one [M, N] matrix: [tm, tn] fp32."""
    t = tile_view(x2, block_size)
    w = None if act_weights is None else column_weight_tiles(act_weights, x2.shape[0], block_size)
    if calib.mode == "max":
        return tile_amax(t)
    if calib.mode == "rms":
        return tile_rms(t, w) * calib.rms_factor
    if calib.mode == "percentile":
        return tile_percentile(t, calib.percentile)
    return tile_mse_threshold(t, w, tile_amax(t), calib.mse_grid, amax_floor, scale_fmt, scale_dtype)


def calibrated_quant(
    x: torch.Tensor,
    calib: CalibSettings,
    *,
    block_size=nx.DEFAULT_BLOCK_SIZE,
    scale_fmt: str = "float",
    scale_dtype: torch.dtype = torch.float32,
    amax_floor: float = nx.DEFAULT_AMAX_FLOOR,
    act_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `x` ([M, N] or [E, M, N]) with calibrated scales; returns (q, scale_inv) like the kernel."""
    if calib.mode == "max":  # the fused kernel: one pass, bit-compatible with releases and DeepGEMM
        return dispatch.quant_fp8_block(x, block_size=block_size, scale_fmt=scale_fmt, scale_dtype=scale_dtype,
                                        amax_floor=amax_floor)
    if act_weights is not None:
        if act_weights.numel() != x.shape[-1]:
            raise ValueError(f"activation stats have {act_weights.numel()} channels, the weight has "
                             f"{x.shape[-1]} input channels")
        act_weights = act_weights.to(x.device, torch.float32)
    if not bool(torch.isfinite(x).all()):
        dispatch.quant_fp8_block(x, block_size=block_size)  # raises the kernels' error naming the tile
    mats = [x] if x.dim() == 2 else list(x)
    c = torch.stack([tile_thresholds(m, calib, tuple(block_size), act_weights, amax_floor, scale_fmt,
                                     scale_dtype) for m in mats])
    sf = stored_scale(c if x.dim() == 3 else c[0], amax_floor, scale_fmt, scale_dtype).to(scale_dtype)
    return dispatch.quant_fp8_block(x, block_size=block_size, scale_inv=sf)
