"""The compressed-tensors layout, shared by every format that writes it (fp8-ct, fp8-channel, mxfp8,
mxfp4, nvfp4-ct): per-module tensor names (`<module>.weight` or `.weight_packed`, `.weight_scale`),
fused 3D experts written per expert, the `ignore` patterns, the quantization_config, and `Scheme`, the
behaviour of a compressed-tensors scheme that rounds weights per module (fp8-channel, mxfp8, mxfp4, w4a16).

compressed-tensors has no layout for fused 3D expert tensors: `experts.gate_up_proj` [E, 2I, H]
(gate rows first, as transformers' fused experts chunk it) and `experts.down_proj` [E, H, I] are
written per expert as the 2D linears compressed-tensors and vLLM read (`experts.{e}.gate_proj`,
`up_proj`, `down_proj`), quantized in one launch over all experts. Other 3D tensors stay as they are,
and so do the other members of their fused module (q/k/v, gate/up load as one layer).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

from . import Format

QUANT_METHOD = "compressed-tensors"  # quantization_config.quant_method
LAYOUT = "compressed-tensors"  # Format.layout of the formats written in it
FUSED_3D_KEPT = "ct:fused-3d-kept"
FUSED_KEPT = "ct:fused-with-kept"
FUSED_EXPERTS = {"experts.gate_up_proj": ("gate_proj", "up_proj"), "experts.down_proj": ("down_proj",)}


def quantization_config_of(config: dict) -> dict:
    """config.json's compressed-tensors quantization_config, {} if it has another (or none)."""
    qc = config.get("quantization_config") or {}
    return qc if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD else {}


def weight_args(qc: dict) -> dict:
    """The weights QuantizationArgs of a compressed-tensors config's first group ({} if none)."""
    groups = list((qc.get("config_groups") or {}).values())
    return (groups[0].get("weights") or {}) if groups and isinstance(groups[0], dict) else {}


def module_of(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def fused_experts(name: str, shape: tuple[int, ...]):
    """For a fused 3D expert tensor: (experts module prefix, its projections split along rows); else None."""
    for suffix, parts in FUSED_EXPERTS.items():
        if len(shape) == 3 and name.endswith("." + suffix) and shape[1] % len(parts) == 0:
            return name[: -len(suffix)] + "experts", parts
    return None


def output_modules(name: str, shape: tuple[int, ...]) -> list[str]:
    """The quantized modules a source weight becomes: its own module, or per expert and projection for
    a fused 3D expert tensor."""
    fused = fused_experts(name, shape)
    if not fused:
        return [module_of(name)]
    prefix, parts = fused
    return [f"{prefix}.{e}.{p}" for e in range(shape[0]) for p in parts]


def split_source(name: str, x) -> list:
    """A source weight as the matrices its output modules hold (output_modules' order): [x], or per
    expert and projection for a fused 3D expert tensor (gate rows first)."""
    fused = fused_experts(name, tuple(x.shape))
    if not fused:
        return [x]
    n_parts = len(fused[1])
    return [x[e].chunk(n_parts, dim=0)[p] for e in range(x.shape[0]) for p in range(n_parts)]


def split_sources(st: dict) -> dict[str, tuple[str, int]]:
    """module -> (source tensor, index in split_source): the modules a compressed-tensors output of
    source tensors `st` holds, fused 3D experts per expert and projection."""
    src_of: dict[str, tuple[str, int]] = {}
    for n, info in st.items():
        for i, m in enumerate(output_modules(n, tuple(info.shape))):
            src_of.setdefault(m, (n, i))
    return src_of


def output_module(stored: str) -> str:
    """The module an output tensor `X.weight` / `X.weight_packed` belongs to."""
    return module_of(stored.removesuffix("_packed"))


def split_outputs(name: str, outs: list) -> list:
    """Tensors made in one launch over a whole weight -> per output module, in output_modules' order
    (a fused 3D expert tensor: each tensor split per expert and projection, then interleaved)."""
    if not fused_experts(name, tuple(outs[0].shape)):
        return outs
    return [part.contiguous() for pieces in zip(*(split_source(name, o) for o in outs)) for part in pieces]


def fused_3d_kept(name: str, shape: tuple[int, ...]) -> str | None:
    """3D tensors other than fused experts have no compressed-tensors layout: kept."""
    return FUSED_3D_KEPT if len(shape) == 3 and not fused_experts(name, shape) else None


def keep_fused_partners(tensors, quantized, transform) -> None:
    """q/k/v, gate/up and w1/w3 are one layer in the engines: when one member is kept, keep all (their
    outputs then as `transform` makes a kept tensor's)."""
    from ..classify import KEEP, fused_group_key

    kept_groups = {fused_group_key(t.name) for t in tensors if t.decision != quantized} - {None}
    for t in tensors:
        if t.decision == quantized and fused_group_key(t.name) in kept_groups:
            t.decision, t.rule = KEEP, FUSED_KEPT
            t.outputs = transform.outputs(t)


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


def _converted_modules(plan) -> list[str]:
    from ..classify import KEEP

    return sorted(module_of(t.name) for t in plan.tensors if t.decision != KEEP)


def _kept_weight_modules(plan) -> list[str]:
    """Every module whose `.weight` stays unquantized, whatever its rank: compressed-tensors' name-based
    readers take any `X.weight` (X not ending in "norm") for a Linear under a `Linear` target."""
    from ..classify import KEEP
    from ..st_io import FP8_DTYPES

    return sorted(t.name.removesuffix(".weight") for t in plan.tensors
                  if t.decision == KEEP and t.name.endswith(".weight") and t.dtype not in FP8_DTYPES)


def ct_ignore(plan) -> list[str]:
    """Class targets (`Linear`) select every linear; the kept ones are ignored by collapsed patterns.
    (One `re:^exact$` target per module made compressed-tensors' matching quadratic: minutes for a
    few thousand linears.)"""
    return ignore_patterns(_kept_weight_modules(plan), _converted_modules(plan))


def ct_config(fmt: str, weights: dict, acts: dict | None, plan) -> dict:
    """A compressed-tensors quantization_config: one `Linear` group, the kept modules ignored."""
    return {"quant_method": QUANT_METHOD, "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": acts, "output_activations": None, "format": fmt}},
            "ignore": ct_ignore(plan), "kv_cache_scheme": None}


@dataclass(frozen=True)
class Scheme(Format):
    """A compressed-tensors scheme fp8norm rounds per module from bf16 or block FP8 (`quantize --to`,
    `convert --to`), and reads back to bf16/fp16 only. A scheme module sets the fields and defines
    weight_args(), expected_scale() / bad_scales(), quantize() and dequantize()."""
    ct_format: str = ""             # quantization_config.format
    weight_dtype: str = "F8_E4M3"   # the stored elements' safetensors dtype
    scale_dtypes: tuple = ("U8",)   # the scale's accepted safetensors dtypes (the first is written)

    # the class attributes of Format a scheme sets
    quantizes_anew = True
    per_module = True
    tensors_per_member = 2

    @property
    def elements_suffix(self) -> str:
        """`.weight`, or `.weight_packed` where 4-bit elements are packed."""
        return ".weight_packed" if self.elements_per_byte > 1 else ".weight"

    @property
    def member_suffixes(self) -> tuple[str, ...]:
        """The names of a module's stored tensors after the module's (Member.tensors' order)."""
        return (self.elements_suffix, ".weight_scale")

    def weight_args(self) -> tuple[dict, dict | None]:
        """(weights, input_activations) QuantizationArgs as compressed-tensors serializes the preset."""
        raise NotImplementedError(self.name)

    def matches(self, qc: dict) -> bool:
        """Whether a compressed-tensors quantization_config is this scheme's."""
        return qc.get("format") == self.ct_format and weight_args(qc).get("strategy") == self.weight_args()[0]["strategy"]

    def detect(self, config, tensors):
        from ..kernels.numerics import fp8_block as nx

        return nx.DEFAULT_BLOCK_SIZE if self.matches(quantization_config_of(config)) else None

    def expected_scale(self, shape: tuple) -> tuple:
        """The scale shape of a stored weight of `shape`."""
        raise NotImplementedError(self.name)

    def fits(self, shape: tuple) -> bool:
        """Whether a stored weight of `shape` lies on the scale grid."""
        return True

    def bad_scales(self, values):
        """The scale values that are no scale (a bool tensor)."""
        raise NotImplementedError(self.name)

    def quantize(self, x, src_scale_inv, src_block_size, rule) -> list:
        raise NotImplementedError(self.name)

    def dequantize(self, stored, scale, out_dtype):
        raise NotImplementedError(self.name)

    # -- Format's behaviour
    def scaled_weights(self, tensors, skip=frozenset()):
        if self.elements_per_byte == 1:
            return super().scaled_weights(tensors, skip)
        packed = self.elements_suffix.removeprefix(".weight")  # packed bytes are U8: X_packed -> X_scale
        return {n: n.removesuffix(packed) + "_scale" for n in tensors
                if n.endswith(self.elements_suffix) and n.removesuffix(packed) + "_scale" in tensors}

    def check_sources(self, ckpt, scale_of, block_size=None) -> None:
        """Element and scale dtypes, scale shapes, and scale values, one line naming the tensor."""
        from ..source_checks import PlanError
        from ..st_io import read_tensor

        for name, sname in scale_of.items():
            w, sc = ckpt.tensors[name], ckpt.tensors[sname]
            want_w, want_s = self.weight_dtype, self.scale_dtypes
            if w.dtype != want_w or sc.dtype not in want_s or len(w.shape) not in (2, 3):
                raise PlanError(f"{w.file.name}: {self.name} tensor {name!r} is {w.dtype} {list(w.shape)} with scale "
                                f"{sc.dtype}; expected {want_w} 2D/3D with a {'/'.join(want_s)} scale")
            expected = self.expected_scale(tuple(w.shape))
            if tuple(sc.shape) != expected or not self.fits(tuple(w.shape)):
                raise PlanError(f"{sc.file.name}: scale {sname!r} has shape {list(sc.shape)}, but {self.name} weight "
                                f"{name!r} {list(w.shape)} needs {list(expected)}")
            bad = self.bad_scales(read_tensor(sc))
            if bool(bad.any()):
                raise PlanError(f"{sc.file.name}: scale {sname!r} holds {int(bad.sum())} invalid value(s) (NaN, Inf or "
                                f"<= 0); its weight cannot be read")

    def refuse_target(self, src, target, members):
        return None if target.dense_dtype else f"{src}: is {self.kind}; it converts to bf16 or fp16 only"

    @property
    def rule_label(self) -> str:
        return self.name

    def decode(self, xs, block_size, out_dtype):
        return self.dequantize(xs[0], xs[1], out_dtype)

    def kept_reason(self, name, shape):
        return fused_3d_kept(name, shape)

    def convert_decision(self, name, info, scale, candidate, source):
        from ..classify import Decision, KEEP

        if not candidate:
            return None
        kept = self.kept_reason(name, info.shape)
        return (KEEP, kept) if kept else (Decision.SCHEME, f"{'fp8' if scale else 'bf16'}->{self.name}")

    def outputs(self, name, shape, dtype="BF16"):
        """Per module (a fused 3D expert tensor: per expert and projection, experts outermost)."""
        from ..st_io import OutEntry

        fused = fused_experts(name, shape)
        if fused:
            prefix, parts = fused
            e, rows, cols = shape
            return [o for i in range(e) for p in parts
                    for o in self.outputs(f"{prefix}.{i}.{p}.weight", (rows // len(parts), cols), dtype)]
        m = module_of(name)
        elements = (*shape[:-1], shape[-1] // self.elements_per_byte)
        return [OutEntry(name if self.elements_per_byte == 1 else m + self.elements_suffix, self.weight_dtype, elements),
                OutEntry(m + ".weight_scale", self.scale_dtypes[0], self.expected_scale(elements))]

    def encode(self, x, *, name="", src_scale_inv=None, src_block_size=(128, 128), rule=None, global_amax=None):
        return split_outputs(name, self.quantize(x, src_scale_inv, src_block_size, rule))

    def quantization_config(self, plan):
        return ct_config(self.ct_format, *self.weight_args(), plan)

    def written_members(self, qt, st):
        from . import Member

        src_of = split_sources(st)
        return {m: Member(tuple(m + s for s in self.member_suffixes), src_of.get(m))
                for m in sorted(n.removesuffix(".weight_scale") for n in qt if n.endswith(".weight_scale"))}

    def output_key(self, stored):
        return output_module(stored)

    def source_parts(self, name, x):
        return split_source(name, x)

    def compare_member(self, key, shard, stored, x, bands, mx_rule=None):
        from ..checks import compare_scheme  # torch: not at the registry's import

        return compare_scheme(self, key, shard, *stored, x, bands, mx_rule)


def apply_to_plan(plan, transform) -> None:
    """Rewrite a quantize plan's FP8 entries into the outputs of `transform` (quantize's SchemeQuantize,
    for its format); rules get `->scheme`; weights with no readable layout are kept, with the reason as
    their rule."""
    from ..classify import FP8, KEEP

    fmt = transform.format
    for t in plan.tensors:
        if t.decision == FP8 and (reason := fmt.kept_reason(t.name, t.shape)):
            t.decision, t.rule = KEEP, reason
    keep_fused_partners(plan.tensors, FP8, transform)
    for t in plan.tensors:
        if t.decision == FP8:
            t.rule = f"{t.rule}->{fmt.kind}"
        t.outputs = transform.outputs(t)
    plan.scheme = fmt.kind
