"""The numeric rules of int4 weight-only W4A16 (compressed-tensors `pack-quantized`, served by vLLM's
Marlin kernels), shared by the Triton kernel and its torch twin.

The scheme is compressed-tensors' preset W4A16 (quantization/quant_scheme.py `_int_wnam(4)`):
QuantizationArgs(num_bits=4, type=int, strategy=group, group_size=128, symmetric=True), calibrated by
llm-compressor's `model_free_ptq` with its min-max observer (observers/min_max.py
`MemorylessMinMaxObserver`: amin / amax of each group, in the weight's dtype D). Per group of G
consecutive elements along the input (last) dim, with compressed-tensors 0.20 as the source:

    range      q_min, q_max = -8, 7                   helpers.py `_calculate_range`: -2^b/2, 2^b/2 - 1
    scale      s = D(amax / 7.5)                      helpers.py `calculate_qparams`, symmetric: max(|min(amin, 0)|,
                                                      |max(amax, 0)|) / ((q_max - q_min) / 2), in D
               s = eps(D) where s == 0                same function, step 5 (`_get_dtype_eps`: finfo(D).eps)
    quotient   v = x / s                              forward_helpers.py: fp32 (`_quantize_kernel`, tl.div_rn:
                                                      the CUDA path, llm-compressor's default device) or D
                                                      (`_quantize`, torch: the CPU path) -- `rule` below
    code       q = round(clamp(v, -8, 7))             `round_to_quantized_type_args`: clamp, then torch.round
                                                      (`rint` on CUDA): ties to even; -7.5 -> -8, 7.5 -> 7
    dequant    q * s                                  forward_helpers.py `_dequantize`

The scale is stored in D (lifecycle/initialize.py: the observed dtype for fp16/bf16/fp32). D's division
is torch's (fp32 quotient rounded to D); rounding amax / 7.5 first to fp32 and then to D is the same
number, since fp32 carries more than 2p + 2 bits of a p-bit D (double rounding is innocuous).
A last dim that is not a multiple of G is refused, as compressed-tensors does (`_process_group`:
"tensor column shape must be divisble by the given group_size") and llm-compressor's model_free_ptq
(`validate_weight_for_quantization`).

`rule`: "ct" (default) divides in fp32, as compressed-tensors' Triton `_quantize_kernel` does on CUDA,
where llm-compressor quantizes by default; "ct-cpu" rounds the quotient to D first, as its torch
`_quantize` does on CPU. They differ only for a bf16/fp16 weight whose fp32 quotient rounds in D onto
k + 0.5 from the side that the tie (to even) does not take: about 0.6% of codes of a
Gaussian bf16 weight.

Stored layout (compressed-tensors `pack-quantized`, compressors/pack_quantized/helpers.py
`pack_to_int32`): `weight_packed` int32 [..., M, N/8], element 8j + i as the unsigned nibble q + 8 in
bits 4i..4i+3 of word j; `weight_scale` D [..., M, N/G]; `weight_shape` int64 [M, N] (the original shape,
`torch.tensor(weight.shape)`); no zero point (symmetric).
"""

from __future__ import annotations

import torch

from . import fp8_block as nx

GROUP_SIZE = 128
# The group sizes vLLM's Marlin kernels serve (MARLIN_SUPPORTED_GROUP_SIZES, less -1: per channel).
GROUP_SIZES = (32, 64, 128)
Q_MIN, Q_MAX = -8, 7
HALF_RANGE = (Q_MAX - Q_MIN) / 2  # 7.5
OFFSET = 8  # pack_to_int32 stores q + 2^(bits - 1)
PER_WORD = 8  # 4-bit values per int32
RULES = ("ct", "ct-cpu")
DEFAULT_RULE = "ct"
INPUT_DTYPES = nx.INPUT_DTYPES
OUT_DTYPES = nx.OUT_DTYPES


def check_rule(rule: str) -> bool:
    """True where the quotient is rounded to the weight's dtype ("ct-cpu")."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    return rule == "ct-cpu"


def scale_eps(dtype: torch.dtype) -> float:
    """The scale compressed-tensors gives an all-zero group: finfo(D).eps (2^-7 bf16, 2^-10 fp16, 2^-23 fp32)."""
    return torch.finfo(dtype).eps


def group_scale(group_amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 group amax -> fp32 scale on D's grid: D(amax / 7.5), eps(D) where that is 0 (NaN stays NaN)."""
    s = (group_amax.float() / HALF_RANGE).to(dtype).float()
    return torch.where(s == 0, scale_eps(dtype), s)


def quantize_groups(groups: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, round_quotient: bool) -> torch.Tensor:
    """fp32 [..., groups, G] values and fp32 [..., groups] scales -> int32 codes in [-8, 7]."""
    v = groups / scale.unsqueeze(-1)
    if round_quotient:
        v = v.to(dtype).float()
    return v.clamp_(Q_MIN, Q_MAX).round_().to(torch.int32)  # round: ties to even


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int codes in [-8, 7], [..., N] (N % 8 == 0) -> int32 [..., N/8], as compressed-tensors' pack_to_int32."""
    nibbles = (codes.to(torch.int64) + OFFSET).unflatten(-1, (-1, PER_WORD))
    shifts = 4 * torch.arange(PER_WORD, device=codes.device, dtype=torch.int64)
    words = (nibbles << shifts).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., N/8] -> int8 codes [..., N] (the inverse of pack_int4)."""
    shifts = 4 * torch.arange(PER_WORD, device=packed.device, dtype=torch.int32)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF
    return (nibbles - OFFSET).to(torch.int8).flatten(-2)


def scale_shape(shape: tuple[int, ...], group_size: int) -> tuple[int, ...]:
    *lead, m, n = shape
    return (*lead, m, n // group_size)


def packed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    *lead, m, n = shape
    return (*lead, m, n // PER_WORD)


def weight_shape(shape: tuple[int, ...]) -> torch.Tensor:
    """The `weight_shape` tensor compressed-tensors stores next to `weight_packed` (int64)."""
    return torch.tensor(tuple(shape), dtype=torch.int64)


def check_group_size(group_size) -> int:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES} (what vLLM's Marlin kernels serve), got {group_size!r}")
    return int(group_size)


def check_quant_args(x, group_size, rule) -> tuple[int, bool]:
    """Validate quant_int4's arguments (kernel and twin alike); returns (group_size, round_quotient)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be 2D [M, N] or 3D [E, M, N], got shape {tuple(x.shape)}")
    group_size = check_group_size(group_size)
    round_quotient = check_rule(rule)
    if x.shape[-1] % group_size:
        raise ValueError(f"int4 groups of {group_size} need the last dim to be a multiple of {group_size} "
                         f"(compressed-tensors refuses it too): x has shape {tuple(x.shape)}")
    return group_size, round_quotient


def check_dequant_args(packed, scale, group_size, out_dtype) -> tuple[int, int]:
    """Validate dequant_int4's arguments; returns (group_size, N)."""
    group_size = check_group_size(group_size)
    if packed.dtype != torch.int32:
        raise TypeError(f"packed int4 weights must be int32, got {packed.dtype}")
    if scale.dtype not in INPUT_DTYPES:
        raise TypeError(f"scale must be bfloat16, float16 or float32, got {scale.dtype}")
    if packed.dim() not in (2, 3):
        raise ValueError(f"packed must be 2D or 3D, got shape {tuple(packed.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    *lead, m, words = packed.shape
    n = words * PER_WORD
    expected = (*lead, m, n // group_size)
    if tuple(scale.shape) != expected or n % group_size:
        raise ValueError(f"scale has shape {tuple(scale.shape)}, expected {expected} for packed int4 "
                         f"{tuple(packed.shape)} and group_size {group_size}")
    if scale.device != packed.device:
        raise ValueError(f"scale is on {scale.device}, packed on {packed.device}")
    return group_size, n


def raise_if_nonfinite_groups(scale: torch.Tensor, group_size: int) -> None:
    """A group holding NaN/Inf gets a non-finite scale; name the first such group."""
    bad = ~torch.isfinite(scale)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise ValueError(f"input has non-finite values (NaN or Inf) in {int(bad.sum())} group(s) of "
                         f"{group_size}, first at scale index {first}; refusing to quantize")
