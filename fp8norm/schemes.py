"""The weight schemes beyond block FP8, in the compressed-tensors layouts vLLM and transformers read.

  fp8-block    block FP8 (DeepSeek layout, `weight_scale_inv`; fp8norm's default, see quantize.py)
  fp8-channel  FP8 with one fp32 scale per output row: compressed-tensors FP8_DYNAMIC
               (`weight` e4m3, `weight_scale` fp32 [N, 1]; activations per token at run time)
  mxfp8        OCP MXFP8: `weight` e4m3, `weight_scale` uint8 E8M0 [N, K/32] (`mxfp8-quantized`)
  mxfp4        OCP MXFP4: `weight_packed` uint8 [N, K/2], `weight_scale` uint8 E8M0 [N, K/32]
               (`mxfp4-pack-quantized`)

The MX schemes are weight-only (activations stay in the model dtype: MXFP8A16 / MXFP4A16).
compressed-tensors has no layout for fused 3D expert tensors: `experts.gate_up_proj` [E, 2I, H]
(gate rows first, as transformers' fused experts chunk it) and `experts.down_proj` [E, H, I] are
written per expert as the 2D linears compressed-tensors and vLLM read (`experts.{e}.gate_proj`,
`up_proj`, `down_proj`), quantized in one launch over all experts. Other 3D tensors, and MX weights
whose input dim is not a multiple of 32, stay as they are, and so do the other members of their fused
module (q/k/v, gate/up load as one layer).
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch

from . import dispatch
from .kernels.numerics import mx
from .classify import FP8, KEEP, fused_group_key
from .st_io import OutEntry

BLOCK = "fp8-block"
CHANNEL = "fp8-channel"
MXFP8 = "mxfp8"
MXFP4 = "mxfp4"
SCHEMES = (BLOCK, CHANNEL, MXFP8, MXFP4)
CT_SCHEMES = (CHANNEL, MXFP8, MXFP4)
CT_FORMAT = {CHANNEL: "float-quantized", MXFP8: "mxfp8-quantized", MXFP4: "mxfp4-pack-quantized"}
FUSED_3D_KEPT = "ct:fused-3d-kept"
UNALIGNED_KEPT = "mx:unaligned-kept"
FUSED_KEPT = "ct:fused-with-kept"


def ct_scheme(qcfg: dict) -> str | None:
    """The scheme of a compressed-tensors quantization_config (fp8-channel, mxfp8, mxfp4), None for any
    other (block FP8 in compressed-tensors' layout included)."""
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") != "compressed-tensors":
        return None
    groups = list((qcfg.get("config_groups") or {}).values())
    strategy = (groups[0].get("weights") or {}).get("strategy") if groups and isinstance(groups[0], dict) else None
    for scheme in CT_SCHEMES:
        if qcfg.get("format") == CT_FORMAT[scheme] and (scheme != CHANNEL or strategy == "channel"):
            return scheme
    return None


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"scheme {scheme!r}: expected one of {', '.join(SCHEMES)}")
    return scheme


def mx_rule_of(scheme: str, rule: str | None) -> str | None:
    """The MX scale rule a run to `scheme` uses: `rule`, or the default, for mxfp8 / mxfp4; None for other
    schemes, where giving one is an error."""
    if scheme not in (MXFP8, MXFP4):
        if rule is not None:
            raise ValueError(f"--mx-rule applies to mxfp8 and mxfp4, not {scheme}")
        return None
    return mx.check_rule(rule or mx.DEFAULT_RULE)


def module_of(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


FUSED_EXPERTS = {"experts.gate_up_proj": ("gate_proj", "up_proj"), "experts.down_proj": ("down_proj",)}


def _fused_experts(name: str, shape: tuple[int, ...]):
    """For a fused 3D expert tensor: (experts module prefix, its projections split along rows); else None."""
    for suffix, parts in FUSED_EXPERTS.items():
        if len(shape) == 3 and name.endswith("." + suffix) and shape[1] % len(parts) == 0:
            return name[: -len(suffix)] + "experts", parts
    return None


def output_entries(name: str, shape: tuple[int, ...], scheme: str) -> list[OutEntry]:
    """The tensors a weight `name` of `shape` becomes, in compressed-tensors' names (a fused 3D expert
    tensor: per expert and projection, experts outermost)."""
    fused = _fused_experts(name, shape)
    if fused:
        prefix, parts = fused
        e, rows, cols = shape
        return [o for i in range(e) for p in parts
                for o in output_entries(f"{prefix}.{i}.{p}.weight", (rows // len(parts), cols), scheme)]
    m = module_of(name)
    *lead, rows, cols = shape
    if scheme == CHANNEL:
        return [OutEntry(name, "F8_E4M3", shape), OutEntry(m + ".weight_scale", "F32", (*lead, rows, 1))]
    scale = OutEntry(m + ".weight_scale", "U8", (*lead, rows, cols // mx.MX_BLOCK))
    if scheme == MXFP8:
        return [OutEntry(name, "F8_E4M3", shape), scale]
    return [OutEntry(m + ".weight_packed", "U8", (*lead, rows, cols // 2)), scale]


def kept_reason(scheme: str, name: str, shape: tuple[int, ...]) -> str | None:
    """Why a weight the rules would quantize has no readable layout in `scheme` (None: it has one)."""
    if len(shape) == 3 and not _fused_experts(name, shape):
        return FUSED_3D_KEPT
    if scheme in (MXFP8, MXFP4) and shape[-1] % mx.MX_BLOCK:
        return UNALIGNED_KEPT
    return None


def keep_fused_partners(tensors, quantized, transform) -> None:
    """q/k/v, gate/up and w1/w3 are one layer in the engines: when one member is kept, keep all (their
    outputs then as `transform` makes a kept tensor's)."""
    kept_groups = {fused_group_key(t.name) for t in tensors if t.decision != quantized} - {None}
    for t in tensors:
        if t.decision == quantized and fused_group_key(t.name) in kept_groups:
            t.decision, t.rule = KEEP, FUSED_KEPT
            t.outputs = transform.outputs(t)


def apply_to_plan(plan, transform) -> None:
    """Rewrite a quantize plan's FP8 entries into the outputs of `transform` (quantize's SchemeQuantize;
    rules get `->scheme`); weights with no readable layout are kept, with the reason as their rule."""
    scheme = transform.scheme
    for t in plan.tensors:
        if t.decision == FP8 and (reason := kept_reason(scheme, t.name, t.shape)):
            t.decision, t.rule = KEEP, reason
    keep_fused_partners(plan.tensors, FP8, transform)
    for t in plan.tensors:
        if t.decision == FP8:
            t.rule = f"{t.rule}->{scheme}"
        t.outputs = transform.outputs(t)
    plan.scheme = scheme


def check_sources(ckpt, scale_of: dict[str, str], scheme: str) -> None:
    """A checkpoint in `scheme`'s layout, before anything is read back: element and scale dtypes, scale
    shapes, and scale values (finite and > 0; E8M0 codes other than NaN), one line naming the tensor."""
    from .plan import PlanError
    from .st_io import read_tensor

    for name, sname in scale_of.items():
        w, sc = ckpt.tensors[name], ckpt.tensors[sname]
        want_w = "U8" if scheme == MXFP4 else "F8_E4M3"
        want_s = ("F32", "BF16", "F16") if scheme == CHANNEL else ("U8",)
        if w.dtype != want_w or sc.dtype not in want_s or len(w.shape) not in (2, 3):
            raise PlanError(f"{w.file.name}: {scheme} tensor {name!r} is {w.dtype} {list(w.shape)} with scale "
                            f"{sc.dtype}; expected {want_w} 2D/3D with a {'/'.join(want_s)} scale")
        *lead, rows, cols = w.shape
        n = 2 * cols if scheme == MXFP4 else cols
        expected = (*lead, rows, 1) if scheme == CHANNEL else (*lead, rows, n // mx.MX_BLOCK)
        if tuple(sc.shape) != expected or (scheme != CHANNEL and n % mx.MX_BLOCK):
            raise PlanError(f"{sc.file.name}: scale {sname!r} has shape {list(sc.shape)}, but {scheme} weight "
                            f"{name!r} {list(w.shape)} needs {list(expected)}")
        values = read_tensor(sc)
        bad = (values == mx.E8M0_NAN) if scheme != CHANNEL else ~(torch.isfinite(values.float()) & (values > 0))
        if bool(bad.any()):
            raise PlanError(f"{sc.file.name}: scale {sname!r} holds {int(bad.sum())} invalid value(s) (NaN, Inf or "
                            f"<= 0); its weight cannot be read")


def output_modules(name: str, shape: tuple[int, ...]) -> list[str]:
    """The quantized modules a source weight becomes, in output_entries' order: its own module, or per
    expert and projection for a fused 3D expert tensor."""
    fused = _fused_experts(name, shape)
    if not fused:
        return [module_of(name)]
    prefix, parts = fused
    return [f"{prefix}.{e}.{p}" for e in range(shape[0]) for p in parts]


def split_source(name: str, x: torch.Tensor) -> list[torch.Tensor]:
    """A source weight as the matrices its output modules hold (output_modules' order): [x], or per
    expert and projection for a fused 3D expert tensor (gate rows first)."""
    fused = _fused_experts(name, tuple(x.shape))
    if not fused:
        return [x]
    n_parts = len(fused[1])
    return [x[e].chunk(n_parts, dim=0)[p] for e in range(x.shape[0]) for p in range(n_parts)]


def quantize_weight(scheme: str, x: torch.Tensor, *, src_scale_inv=None, src_block_size=(128, 128),
                    rule: str = mx.DEFAULT_RULE, name: str = "") -> list[torch.Tensor]:
    """One weight `name` (bf16, or FP8 with its block scales) -> its outputs in `scheme`, in
    output_entries' order (a fused 3D expert tensor: one launch, then split per expert and projection)."""
    outs = _quantize(scheme, x, src_scale_inv, src_block_size, rule)
    fused = _fused_experts(name, tuple(x.shape))
    if not fused:
        return outs
    return [part.contiguous() for pieces in zip(*(split_source(name, o) for o in outs)) for part in pieces]


def _quantize(scheme, x, src_scale_inv, src_block_size, rule) -> list[torch.Tensor]:
    if scheme == CHANNEL:
        # bf16-valued scales stored as fp32: transformers (bf16 scale) and vLLM (fp32) read the same values
        q, scale = dispatch.quant_fp8_channel(x, scale_dtype=torch.bfloat16, src_scale_inv=src_scale_inv,
                                              src_block_size=src_block_size)
        return [q, scale.float()]
    return list(dispatch.quant_mx(x, fmt=scheme, rule=rule, src_scale_inv=src_scale_inv,
                                  src_block_size=src_block_size))


def dequantize_weight(scheme: str, stored: torch.Tensor, scale: torch.Tensor, out_dtype) -> torch.Tensor:
    if scheme == CHANNEL:
        return dispatch.dequant_fp8_channel(stored, scale, out_dtype=out_dtype)
    return dispatch.dequant_mx(stored, scale, fmt=scheme, out_dtype=out_dtype)


# --------------------------------------------------------------------------- compressed-tensors config


def ct_scheme_args(scheme: str) -> tuple[dict, dict | None]:
    """(weights, input_activations) QuantizationArgs as compressed-tensors 0.20 serializes its presets
    FP8_DYNAMIC, MXFP8A16 and MXFP4A16."""
    if scheme == CHANNEL:
        return ({"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False,
                 "group_size": None},
                {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True,
                 "group_size": None})
    return ({"num_bits": 8 if scheme == MXFP8 else 4, "type": "float", "strategy": "group", "group_size": mx.MX_BLOCK,
             "symmetric": True, "dynamic": False, "scale_dtype": "torch.uint8", "zp_dtype": "torch.uint8"}, None)


_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")


def ignore_patterns(kept: list[str], quantized: list[str]) -> list[str]:
    """compressed-tensors `ignore` entries for the kept Linear modules, collapsed over layer and expert
    indices: `model.layers.0.mlp.gate` ... `model.layers.47.mlp.gate` -> `re:^model\\.layers\\.\\d+\\.mlp\\.gate$`.
    A collapsed pattern that would also match a quantized module falls back to the exact names it
    covers, so the ignore list selects exactly `kept`. `lm_head` is always ignored unless quantized
    (tied embeddings have no lm_head.weight in the checkpoint, but the model has the Linear)."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name in kept:
        groups[_INDEX.sub("\0", name)].append(name)
    quantized_set = set(quantized)
    out = []
    by_shape: dict[str, list[str]] = defaultdict(list)
    for q in quantized:
        by_shape[_INDEX.sub("\0", q)].append(q)
    for shape, names in groups.items():
        if len(names) > 1 and shape not in by_shape:
            out.append("re:^" + re.escape(shape).replace("\0", r"\d+") + "$")
        else:
            out.extend(names)
    if "lm_head" not in quantized_set and "lm_head" not in kept:
        out.append("lm_head")
    return sorted(out)
