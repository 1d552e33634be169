"""The numeric rules of MXFP8 and MXFP4 (OCP Microscaling), shared by the Triton kernels and the twins.

OCP Microscaling Formats (MX) Specification v1.0 (Sept 2023), section 5 and 6.3: a block of k = 32
consecutive elements along the input (last) dim shares one E8M0 scale X (a biased power of two,
code 255 = NaN); elements are E4M3 (MXFP8) or E2M1 (MXFP4); value = X * element. The spec's
conversion (6.3) picks

    X = 2^(floor(log2(max_i |V_i|)) - emax_elem)       emax_elem = 8 (E4M3), 2 (E2M1)
    P_i = quantize_to_element_format(V_i / X)            round to nearest even, saturating at the max normal

so a block whose amax mantissa exceeds the element's max mantissa (E4M3 448 = 1.75 * 2^8, E2M1 6 = 1.5 * 2^2)
saturates its largest elements (about 14 % of Gaussian blocks in MXFP8). Three rules (`rule=`), all read the same
(compressed-tensors' `decompress_mx_scale` and vLLM decode only X = 2^(code - 127)):

  rceil  X = 2^ceil(log2(amax / elem_max)): the smallest power of two that clips nothing. NVIDIA's
         `cvt.rp.satfinite.ue8m0x2.f32` and Triton's `downcast_to_mxfp` (DequantScaleRoundingMode.ROUND_UP,
         triton_kernels/numerics_details/mxfp_details/_downcast_to_mxfp.py) round fl(amax / elem_max) up;
         here it is exact on amax's bits: floor's code, plus one when amax's mantissa exceeds the element
         max's (the same codes as theirs wherever amax / elem_max is a normal fp32, since rounding that
         quotient never crosses a power of two; exact below). gpt-oss's MXFP4 weights use it. Default.
  ocp    the spec's floor rule above; clips.
  ct     compressed-tensors / llm-compressor (`generate_mx_scales`, quantization/utils/mxfp_utils.py):
         amax rounded to a power of two first, up when its mantissa is >= 1.75 (`round_to_power_2` with
         the E2M1 mantissa width, for MXFP4 and MXFP8 alike), then emax_elem subtracted: llm-compressor's
         bytes. Clips MXFP4 blocks with mantissa in (1.5, 1.75); for MXFP8 it is rceil except at 1.75.

SQNR on 2048 x 4096 bf16 weights (benchmarks/test_bench_schemes.py::test_mx_rule_sqnr; share of
blocks whose max element saturates in brackets):

                  Gaussian (std 0.02)   heavy-tailed (fp8norm.examples.heavy_tailed)
  MXFP8  rceil    31.51                 31.48
         ct       31.51                 31.48
         ocp      30.68 (13.7 %)        28.17 (19.0 %)
  MXFP4  rceil    18.53                 16.26
         ct       19.00 (27.4 %)        16.68 (22.2 %)
         ocp      18.86 (41.6 %)        15.99 (41.9 %)

rceil is the default: the rule that clips nothing in either format, the best on MXFP8 (ct equals it
to 0.001 dB; rceil keeps X where amax's mantissa is exactly 1.75, which ct doubles) and 0.27 dB above
the spec's on heavy-tailed MXFP4. ct clips MXFP4 and still measures 0.4 dB higher there (saturating a
block's max by at most 1.75/1.5 costs less than a coarser step for the other 31): `rule="ct"` for it.

Every code is at most 254 - emax_elem, so elem_max * X (and every element) stays finite in fp32 and
bfloat16: a block in fp32's top binade (amax >= 2^127 * mantissa of elem_max) saturates there instead
of rounding onto 2^128 (inf), which `ct` and `rceil` would otherwise do for a bfloat16-max weight.

Stored layout (compressed-tensors `mxfp8-quantized` / `mxfp4-pack-quantized`, read by vLLM):
  MXFP8: `weight` float8_e4m3fn [..., M, N],    `weight_scale` uint8 [..., M, N/32] (E8M0 codes)
  MXFP4: `weight_packed` uint8 [..., M, N/2] (element 2k in the low nibble, as NVFP4),
         `weight_scale` uint8 [..., M, N/32]
Scale codes are clamped to [0, 254 - emax_elem]: an all-zero block gets code 0 (2^-127), as compressed-tensors
stores it; a block holding NaN/Inf gets 255 and the wrappers raise naming it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import e2m1
from . import fp8_block as nx
from .args import check_amax_args

MX_BLOCK = 32
E8M0_NAN = 255
SCALE_RULES = ("rceil", "ocp", "ct")
DEFAULT_RULE = "rceil"
# compressed-tensors' round_to_power_2 on fp32 bits: + 1 << (23 - 1 - 1) bumps the exponent when the
# top two mantissa bits are set (mantissa >= 1.75).
CT_ROUND_ADD = 1 << 21
MANTISSA_MASK = (1 << 23) - 1


@dataclass(frozen=True)
class MXFormat:
    name: str
    emax: int  # exponent of the element format's largest normal
    elem_bits: int
    max_mantissa: int  # fp32 mantissa bits of the element format's largest normal (1.75: 0x600000)

    @property
    def max_code(self) -> int:
        """The largest code any rule gives: elem_max * 2^(code - 127) is finite in fp32 and bfloat16."""
        return 254 - self.emax

    def packed_cols(self, n: int) -> int:
        return n if self.elem_bits == 8 else n // 2


MXFP8 = MXFormat("mxfp8", 8, 8, 0x600000)
MXFP4 = MXFormat("mxfp4", 2, 4, 0x400000)
FORMATS = {f.name: f for f in (MXFP8, MXFP4)}
INPUT_DTYPES = nx.INPUT_DTYPES  # plus float8_e4m3fn with its block scales
OUT_DTYPES = nx.OUT_DTYPES


def mx_format(fmt) -> MXFormat:
    if isinstance(fmt, MXFormat):
        return fmt
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {tuple(FORMATS)}, got {fmt!r}")
    return FORMATS[fmt]


def check_rule(rule: str) -> str:
    if rule not in SCALE_RULES:
        raise ValueError(f"rule must be one of {SCALE_RULES}, got {rule!r}")
    return rule


def round_add(fmt: MXFormat, rule: str) -> int:
    """What a rule adds to amax's fp32 bits before their exponent field is read (the kernels' ROUND_ADD):
    the carry into the exponent is the rounding up. rceil carries exactly when the mantissa exceeds
    elem_max's, ct when it is >= 1.75, ocp never."""
    return {"ocp": 0, "ct": CT_ROUND_ADD, "rceil": MANTISSA_MASK - fmt.max_mantissa}[check_rule(rule)]


def scale_codes(block_amax: torch.Tensor, fmt: MXFormat, rule: str) -> torch.Tensor:
    """fp32 block amax -> int32 E8M0 codes: the biased exponent of amax's bits plus `round_add` (floor(log2)
    + 127 for ocp; 0 for zero and fp32 subnormals) minus emax_elem, clamped to [0, fmt.max_code]; 255 for a
    non-finite amax."""
    bits = block_amax.float().contiguous().view(torch.int32) + round_add(fmt, rule)
    code = (((bits >> 23) & 0xFF) - fmt.emax).clamp(0, fmt.max_code)
    return torch.where(torch.isfinite(block_amax), code, E8M0_NAN)


def scale_value(codes: torch.Tensor) -> torch.Tensor:
    """E8M0 codes (0..254) -> fp32 2^(code - 127), exactly (code 0 is the subnormal 2^-127)."""
    c = codes.to(torch.int32)
    bits = torch.where(c == 0, 1 << 22, c << 23)
    return bits.view(torch.float32)


def inverse_scale(codes: torch.Tensor) -> torch.Tensor:
    """fp32 2^(127 - code) for codes 0..253 (a normal fp32 number), so `x * inverse == x / X`."""
    return ((254 - codes.to(torch.int32).clamp(0, 253)) << 23).view(torch.float32)


def encode_elements(v: torch.Tensor, fmt: MXFormat) -> torch.Tensor:
    """fp32 values already divided by X -> stored elements: e4m3 (saturating RNE) or packed E2M1 bytes."""
    if fmt.elem_bits == 8:
        return nx.saturate_e4m3(v)
    return e2m1.pack_codes(e2m1.e2m1_codes(v))


def decode_elements(stored: torch.Tensor, fmt: MXFormat) -> torch.Tensor:
    """Stored elements -> fp32 element values (E2M1 code 8 is -0.0)."""
    if fmt.elem_bits == 8:
        return stored.float()
    return e2m1.e2m1_table(stored.device)[e2m1.unpack_codes(stored).long()]


def scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    *lead, m, n = shape
    return (*lead, m, n // MX_BLOCK)


def packed_shape(shape: tuple[int, ...], fmt: MXFormat) -> tuple[int, ...]:
    *lead, m, n = shape
    return (*lead, m, fmt.packed_cols(n))


def check_quant_args(x, fmt, rule, src_scale_inv, src_block_size):
    """Validate quant_mx's arguments (kernel and twin alike).

    Returns (MXFormat, round_add(fmt, rule), src scales as contiguous fp32 or None, src_block_size)."""
    fmt = mx_format(fmt)
    add = round_add(fmt, rule)
    src_sf, src_block_size = check_amax_args(x, src_scale_inv, src_block_size)
    if x.shape[-1] % MX_BLOCK:
        raise ValueError(f"MX formats need the last dim to be a multiple of {MX_BLOCK}: x has shape "
                         f"{tuple(x.shape)}")
    return fmt, add, src_sf, src_block_size


def check_dequant_args(stored, scale, fmt, out_dtype):
    """Validate dequant_mx's arguments; returns (MXFormat, N)."""
    fmt = mx_format(fmt)
    want = torch.float8_e4m3fn if fmt.elem_bits == 8 else torch.uint8
    if stored.dtype != want:
        raise TypeError(f"{fmt.name} elements must be {want}, got {stored.dtype}")
    if scale.dtype != torch.uint8:
        raise TypeError(f"scale must be uint8 E8M0 codes, got {scale.dtype}")
    if stored.dim() not in (2, 3):
        raise ValueError(f"elements must be 2D or 3D, got shape {tuple(stored.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    *lead, m, cols = stored.shape
    n = cols if fmt.elem_bits == 8 else 2 * cols
    if tuple(scale.shape) != (*lead, m, n // MX_BLOCK) or n % MX_BLOCK:
        raise ValueError(f"scale has shape {tuple(scale.shape)}, expected {(*lead, m, n // MX_BLOCK)} for "
                         f"{fmt.name} elements {tuple(stored.shape)}")
    if scale.device != stored.device:
        raise ValueError(f"scale is on {scale.device}, elements on {stored.device}")
    return fmt, n


def raise_if_nan_scales(scale: torch.Tensor) -> None:
    """Blocks holding NaN/Inf input get the E8M0 NaN code; name the first such block."""
    bad = scale == E8M0_NAN
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise ValueError(f"input has non-finite values (NaN or Inf) in {int(bad.sum())} block(s) of "
                         f"{MX_BLOCK}, first at scale index {first}; refusing to quantize")
