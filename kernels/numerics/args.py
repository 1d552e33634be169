"""Argument checks shared by the Triton kernels' wrappers and the torch twins (same errors for both)."""

from __future__ import annotations

import torch

from . import fp8_block as nx

# dtypes of the block scales an FP8 source comes with (fp32, bf16, E8M0)
SRC_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float8_e8m0fnu)


def check_block_size(block_size) -> tuple[int, int]:
    bm, bn = (int(b) for b in block_size)
    if bm <= 0 or bn <= 0:
        raise ValueError(f"block_size must be two positive ints, got {tuple(block_size)}")
    return bm, bn


def check_input(x, x_scale, scale_arg: str) -> None:
    """x is a bf16/fp16/fp32 tensor, or an e4m3 one given with its block scales (the argument `scale_arg`)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype == torch.float8_e4m3fn:
        if x_scale is None:
            raise TypeError(f"an FP8 x needs its {scale_arg} (block scales) to be quantized")
    elif x.dtype not in nx.INPUT_DTYPES:
        raise TypeError(f"x must be bfloat16, float16 or float32 (or float8_e4m3fn with {scale_arg}), got {x.dtype}")
    elif x_scale is not None:
        raise TypeError(f"{scale_arg} is only for an FP8 x")


def check_quant_args(x, block_size, scale_fmt, scale_dtype, amax_floor, scale_inv, x_scale_inv=None):
    """Validate quant_fp8_block's arguments.

    Returns (block_size, scale_inv as fp32 or None, x_scale_inv as fp32 or None)."""
    check_input(x, x_scale_inv, "x_scale_inv")
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be 2D [M, N] or 3D [E, M, N], got shape {tuple(x.shape)}")
    if scale_fmt not in nx.SCALE_FMTS:
        raise ValueError(f"scale_fmt must be one of {nx.SCALE_FMTS}, got {scale_fmt!r}")
    if scale_dtype not in nx.SCALE_DTYPES:
        raise TypeError(f"scale_dtype must be float32, bfloat16 or float8_e8m0fnu, got {scale_dtype}")
    if scale_dtype == torch.float8_e8m0fnu and scale_fmt != "ue8m0":
        raise ValueError("scale_dtype float8_e8m0fnu holds only powers of two: use scale_fmt='ue8m0'")
    if not amax_floor > 0:
        raise ValueError(f"amax_floor must be > 0 (zero tiles would divide by zero), got {amax_floor}")
    block_size = check_block_size(block_size)
    x_sf = None if x_scale_inv is None else check_block_scale(x_scale_inv, x, block_size, "x_scale_inv", min_value=0)
    if scale_inv is None:
        return block_size, None, x_sf
    return block_size, check_block_scale(scale_inv, x, block_size, "scale_inv", min_value=None), x_sf


def check_block_scale(scale, x, block_size, what, min_value):
    """A block scale tensor for x: right shape and device, finite, > 0 (>= min_value if given); as fp32."""
    expected = nx.scale_inv_shape(tuple(x.shape), block_size)
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"{what} has shape {tuple(scale.shape)}, expected {expected} for x {tuple(x.shape)} "
            f"and block_size {block_size}"
        )
    if scale.device != x.device:
        raise ValueError(f"{what} is on {scale.device}, x on {x.device}")
    sf = scale.float()
    ok = sf >= min_value if min_value is not None else sf > 0
    if not bool((torch.isfinite(sf) & ok).all()):
        raise ValueError(f"{what} must be finite and {'>= 0' if min_value is not None else '> 0'} everywhere")
    return sf.contiguous()


def check_e4m3_operand(q, out_dtype) -> None:
    """An FP8 weight to dequantize (2D or stacked 3D e4m3) and the float type asked of it."""
    if q.dtype != torch.float8_e4m3fn:
        raise TypeError(f"q must be float8_e4m3fn, got {q.dtype}")
    if q.dim() not in (2, 3):
        raise ValueError(f"q must be 2D [M, N] or 3D [E, M, N], got shape {tuple(q.shape)}")
    if out_dtype not in nx.OUT_DTYPES:
        raise TypeError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")


def check_dequant_args(q, scale_inv, block_size, out_dtype):
    """Validate dequant_fp8_block's arguments; returns (block_size, scale_inv as fp32)."""
    check_e4m3_operand(q, out_dtype)
    block_size = check_block_size(block_size)
    expected = nx.scale_inv_shape(tuple(q.shape), block_size)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} for q {tuple(q.shape)} "
            f"and block_size {block_size}"
        )
    return block_size, scale_inv.float().contiguous()


def raise_if_nonfinite_tiles(scale: torch.Tensor) -> None:
    """The kernels mark a tile holding NaN/Inf with a non-finite scale; name the first such tile."""
    bad = ~torch.isfinite(scale.float())
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise ValueError(
            f"input has non-finite values (NaN or Inf) in {int(bad.sum())} tile(s), first at tile index "
            f"{first}; refusing to quantize"
        )


def check_amax_args(x, src_scale_inv, src_block_size):
    """Validate x (and its FP8 block scales); returns (src scales as fp32 or None, src_block_size)."""
    check_input(x, src_scale_inv, "src_scale_inv")
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be 2D [M, N] or 3D [E, M, N], got shape {tuple(x.shape)}")
    bm, bn = (int(b) for b in src_block_size)
    if bm <= 0 or bn <= 0:
        raise ValueError(f"src_block_size must be two positive ints, got {tuple(src_block_size)}")
    if src_scale_inv is None:
        return None, (bm, bn)
    if src_scale_inv.dtype not in SRC_SCALE_DTYPES:
        raise TypeError(f"src_scale_inv must be float32, bfloat16 or float8_e8m0fnu, got {src_scale_inv.dtype}")
    return check_block_scale(src_scale_inv, x, (bm, bn), "src_scale_inv", min_value=0), (bm, bn)
