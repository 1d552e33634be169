"""The numeric rules of NVFP4 (ModelOpt convention), shared by the Triton kernels and the torch twins.

NVFP4 stores a tensor `[..., M, N]` as
- `packed` uint8 `[..., M, N/2]`: two E2M1 codes a byte, element 2k in the low nibble, 2k+1 high;
  a code is sign (bit 3) and magnitude index 0..7 = {0, 0.5, 1, 1.5, 2, 3, 4, 6};
- `weight_scale` float8_e4m3fn `[..., M, N/16]`: one scale per 16 elements along the last dim;
- `weight_scale_2` fp32 (0-dim, or `[E]` for stacked experts) = global_amax / (6 * 448);
and value = e2m1 * (float(weight_scale) * weight_scale_2).

Quantization follows ModelOpt's `NVFP4QTensor` (modelopt/torch/quantization/qtensor/nvfp4_tensor.py,
with the [2^-9, 448] clamp of the group scales that ModelOpt 0.45 added; older ModelOpt stored a
zero scale for a group whose scale underflowed e4m3, and NaN above 448):
    scale_2  = amax.float() / (6.0 * 448.0)                     # get_weights_scaling_factor_2
    s        = group_amax / (6.0 * scale_2)                      # fp32: the product first, then divide
    s[s == 0] = 1.0                                              # get_weights_scaling_factor
    s_q = s.clamp(min=2**-9, max=448).to(float8_e4m3fn)          # _cast_per_block_scale_to_fp8
    q        = x / (s_q.to(float32) * scale_2)                   # quantize: fp32 divisor, then divide
    code     = searchsorted([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5], |q|) + (|q| in {0.75, 1.75, 3.5})
    code    |= (q < 0) << 3;  packed = code[..., 1::2] << 4 | code[..., 0::2]
The bounds and the `+1` on 0.75, 1.75 and 3.5 are round-to-nearest with ties to even codes, and
|q| > 5 saturates to 6. The sign is `q < 0`: -0.0 packs as +0 (0x0), a small negative that rounds
to zero packs as 0x8. ModelOpt dequantizes as `(e2m1 * (float(s_q) * scale_2)).to(dtype)`.

Where fp8norm differs (all outside ModelOpt's well-defined range):
- amax == 0 (all-zero tensor, or a given joint amax of 0) gives scale_2 = 1.0, not 0 (NaN later);
- a group whose divisor s_q * scale_2 underflows to 0 in fp32 (scale_2 below ~2^-140, i.e. a
  global amax under ~1e-39) quantizes to 0 (ModelOpt would divide by zero);
- a given global amax more than ~2^119 below the data's (a value 2^128 times its group's divisor):
  on the GPU the reciprocal-based division turns that quotient's Inf into NaN, code 7 whatever the
  sign (ModelOpt: 7 or 15);
- N % 16 != 0 raises ValueError (ModelOpt pads the last dim);
- code 0x8 dequantizes to -0.0 (ModelOpt's table gives +0.0);
- a 3D `[E, M, N]` tensor gets one scale_2 per expert (each expert is its own Linear in ModelOpt).
"""

from __future__ import annotations

import torch

from . import fp8_block as nx
from .args import check_amax_args
from .e2m1 import E2M1_MAX, e2m1_codes, e2m1_table, pack_codes, unpack_codes  # noqa: F401 (NVFP4's elements)

E4M3_MAX = 448.0
GROUP_SIZE = 16
# Smallest per-group scale ModelOpt (>= 0.45) stores: the e4m3 subnormal 2^-9.
SCALE_MIN = 2.0 ** -9
# weight_scale_2 = amax / SCALE_2_DIVISOR (ModelOpt writes `/ (6.0 * 448.0)`: the same fp32 constant).
SCALE_2_DIVISOR = E2M1_MAX * E4M3_MAX
# Round-to-nearest decision points between the magnitudes; at the ones marked "up" a tie goes to the
# upper code (which is even), at the others to the lower one.

INPUT_DTYPES = nx.INPUT_DTYPES  # plus float8_e4m3fn with src_scale_inv
OUT_DTYPES = nx.OUT_DTYPES



def per_expert(value, t: torch.Tensor, n_exp: int, what: str) -> torch.Tensor:
    """A scalar, or one value per expert of a 3D `t`, as fp32 [n_exp] on t's device."""
    v = torch.as_tensor(value).to(device=t.device, dtype=torch.float32)
    if v.numel() == 1:
        return v.reshape(1).expand(n_exp)
    if t.dim() == 2 or tuple(v.shape) != (n_exp,):
        raise ValueError(f"{what} has shape {tuple(v.shape)}; expected a scalar"
                         + (f" or [{n_exp}] (one per expert)" if t.dim() == 3 else "") + f" for {tuple(t.shape)}")
    return v

def weight_scale_2_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """scale_2 = amax / (6 * 448) in fp32; 1.0 where that is 0 (so all-zero tensors stay finite)."""
    s2 = amax.float() / SCALE_2_DIVISOR
    return torch.where(s2 == 0, torch.ones_like(s2), s2)


def group_scale(group_amax: torch.Tensor, scale_2: torch.Tensor) -> torch.Tensor:
    """fp32 per-group scale before the e4m3 cast: amax / (6 * scale_2), 1.0 where it is exactly 0."""
    s = group_amax / (E2M1_MAX * scale_2)
    return torch.where(s == 0, torch.ones_like(s), s)


def group_scale_e4m3(group_amax: torch.Tensor, scale_2: torch.Tensor) -> torch.Tensor:
    """The stored per-group scale: group_scale clamped to [2^-9, 448], then cast (RNE) to e4m3.

    As ModelOpt's `_cast_per_block_scale_to_fp8` does since 0.45: a group far below the tensor's amax
    keeps the smallest e4m3 scale (2^-9) instead of underflowing to a zero scale. NaN stays NaN.
    """
    return group_scale(group_amax, scale_2).clamp(SCALE_MIN, E4M3_MAX).to(torch.float8_e4m3fn)


# --------------------------------------------------------------------------- argument checks


def check_quant_args(x, global_amax, src_scale_inv, src_block_size, group_size):
    """Validate quant_nvfp4's arguments (kernel and twin alike).

    Returns (group_size, src_block_size, src scales as contiguous fp32 or None,
    global_amax as fp32 `[E]` (E = 1 for 2D) on x's device, or None).
    """
    src_sf, src_block_size = check_amax_args(x, src_scale_inv, src_block_size)
    group_size = int(group_size)
    if group_size < 2 or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two >= 2, got {group_size}")
    if x.shape[-1] % group_size:
        raise ValueError(
            f"NVFP4 needs the last dim to be a multiple of group_size={group_size}: x has shape "
            f"{tuple(x.shape)}"
        )
    n_exp = x.shape[0] if x.dim() == 3 else 1
    if global_amax is None:
        return group_size, src_block_size, src_sf, None
    ga = per_expert(global_amax, x, n_exp, "global_amax")
    if not bool((torch.isfinite(ga) & (ga >= 0)).all()):
        raise ValueError(f"global_amax must be finite and >= 0, got {ga.tolist()}")
    return group_size, src_block_size, src_sf, ga.contiguous()


def check_dequant_args(packed, weight_scale, weight_scale_2, out_dtype):
    """Validate dequant_nvfp4's arguments; returns (group_size, weight_scale_2 as contiguous fp32 [E])."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    if weight_scale.dtype != torch.float8_e4m3fn:
        raise TypeError(f"weight_scale must be float8_e4m3fn, got {weight_scale.dtype}")
    if packed.dim() not in (2, 3):
        raise ValueError(f"packed must be 2D [M, N/2] or 3D [E, M, N/2], got shape {tuple(packed.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    *lead, m, half = packed.shape
    n = 2 * half
    ws_shape = tuple(weight_scale.shape)
    ng = ws_shape[-1] if weight_scale.dim() == packed.dim() else -1
    if ws_shape[:-1] != (*lead, m) or ng < 0 or (ng == 0) != (n == 0) or (ng and n % ng):
        raise ValueError(
            f"weight_scale has shape {ws_shape}, expected [..., {m}, N/group_size] for packed "
            f"{tuple(packed.shape)}"
        )
    group_size = n // ng if ng else GROUP_SIZE
    if group_size < 2 or group_size & (group_size - 1):
        raise ValueError(f"packed {tuple(packed.shape)} and weight_scale {ws_shape} give group size "
                         f"{n}/{ng}: not a power of two >= 2")
    n_exp = lead[0] if lead else 1
    s2 = per_expert(weight_scale_2, packed, n_exp, "weight_scale_2")
    if weight_scale.device != packed.device:
        raise ValueError(f"weight_scale is on {weight_scale.device}, packed on {packed.device}")
    return group_size, s2.contiguous()


def scale_2_for(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """weight_scale_2 from a per-expert amax `[E]`, shaped as returned: 0-dim for 2D x, `[E]` for 3D."""
    s2 = weight_scale_2_from_amax(amax)
    return s2.reshape(()) if x.dim() == 2 else s2.reshape(x.shape[0])


def raise_if_nonfinite_groups(weight_scale: torch.Tensor) -> None:
    """Groups holding NaN/Inf input get the e4m3 NaN code as their scale; name the first such group."""
    bad = (weight_scale.view(torch.uint8) & 0x7F) == 0x7F
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise ValueError(
            f"input has non-finite values (NaN or Inf) in {int(bad.sum())} group(s), first at weight_scale "
            f"index {first}; refusing to quantize"
        )


def nonfinite_flag(amax: torch.Tensor, weight_scale: torch.Tensor, amax_computed: bool) -> torch.Tensor:
    """0-dim bool on the device: NaN/Inf in the computed amax or in any group (no host sync)."""
    bad = ((weight_scale.view(torch.uint8) & 0x7F) == 0x7F).any()
    return bad | (~torch.isfinite(amax)).any() if amax_computed else bad


def raise_if_nonfinite(amax: torch.Tensor, weight_scale: torch.Tensor, amax_computed: bool) -> None:
    """NaN/Inf in the computed amax (named by expert) or in any group (named by index): ValueError."""
    if amax_computed:
        raise_if_nonfinite_amax(amax)
    raise_if_nonfinite_groups(weight_scale)


def raise_if_nonfinite_amax(amax: torch.Tensor) -> None:
    bad = ~torch.isfinite(amax)
    if bool(bad.any()):
        where = "" if amax.dim() == 0 else f" (expert {int(bad.nonzero()[0, 0])})"
        raise ValueError(f"input has non-finite values (NaN or Inf){where}; refusing to quantize")
