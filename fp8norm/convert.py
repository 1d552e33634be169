"""`fp8norm convert SRC DST --to FORMAT`: move a checkpoint between the formats people ship, on the
same streaming pipeline as `quantize` (reader, writer, resume, progress, plan).

  bf16, fp16   dequantize FP8 block weights (fused kernel); quantization_config removed
  fp8          block FP8 in the DeepSeek/transformers layout (from compressed-tensors FP8 block)
  fp8-ue8m0    power-of-two scales for Blackwell/DeepGEMM: relabelled where every scale already is
               one, else requantized from FP8 in one fused kernel pass (error reported per tensor)
  fp8-ct       block FP8 in the compressed-tensors layout (`weight_scale`, config_groups)
  nvfp4        NVFP4 in the ModelOpt layout (`hf_quant_config.json`; weight, weight_scale,
               weight_scale_2)
  nvfp4-ct     NVFP4 in the compressed-tensors `nvfp4-pack-quantized` layout (weight_packed,
               weight_scale, weight_global_scale)
  fp8-channel, mxfp8, mxfp4
               per-channel FP8 / OCP MXFP8 / MXFP4 in compressed-tensors layouts (see fp8norm.schemes),
               from bf16 or block FP8; `bf16`/`fp16` read them back

NVFP4 sources may be bf16 (the quantize rule table picks the linears) or FP8 (fused dequant ->
NVFP4). q/k/v, gate/up and w1/w3 of one module share one global scale (engines fuse them); a fused
3D expert tensor gets one global scale per expert. Weights whose input dimension is not a multiple
of 16 are an error naming them, or stay as they are with `keep_unaligned`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__, dispatch, schemes
from .kernels.numerics import fp8_block as nx
from .checkpoint import open_checkpoint, read_json
from .classify import FP8, KEEP, Decision, fused_group_key, heuristic_rule, quantizable
from .output import PROVENANCE_NAME, json_text, provenance
from .pipeline import RunSummary, Transform, execute_plan, resolve_device
from .plan import Plan, QuantSettings, TensorPlan, check_fp8_sources, config_block_size, lay_out_shards
from .sizes import parse_size
from .st_io import FP8_DTYPES, OutEntry, read_tensor

TARGETS = ("bf16", "fp16", "fp8", "fp8-ue8m0", "fp8-ct", "nvfp4", "nvfp4-ct", *schemes.CT_SCHEMES)
NVFP4_GROUP = 16
HF_QUANT_CONFIG = "hf_quant_config.json"

# decisions of a convert plan
DEQUANT, DEQUANT_NVFP4, RELABEL, UE8M0, NVFP4, SCHEME = (Decision.DEQUANT, Decision.DEQUANT_NVFP4, Decision.RELABEL,
                                                         Decision.UE8M0, Decision.NVFP4, Decision.SCHEME)
NVFP4_SOURCES = ("nvfp4", "nvfp4-ct")  # ModelOpt, compressed-tensors nvfp4-pack-quantized


class ConvertError(ValueError):
    pass


@dataclass(frozen=True)
class SourceFormat:
    kind: str  # "fp8-block" (weight_scale_inv), "fp8-ct" (weight_scale), "unquantized", or a CT scheme
    block_size: tuple[int, int]
    scale_suffix: str


def nvfp4_layout(config: dict, tensors: dict) -> str | None:
    """The NVFP4 layout of a checkpoint (one of NVFP4_SOURCES), None if it is not NVFP4."""
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") == "compressed-tensors" and qc.get("format") == "nvfp4-pack-quantized":
        return "nvfp4-ct"
    if qc.get("quant_method") == "modelopt" or any(n.endswith("_scale_2") for n in tensors):
        return "nvfp4"
    return None


def detect_source(tensors: dict, config: dict) -> SourceFormat:
    qc = config.get("quantization_config") or {}
    # NVFP4 (read back to bf16/fp16 only); FP8 block tensors kept beside it carry `_scale_inv`
    if layout := nvfp4_layout(config, tensors):
        return SourceFormat(layout, nx.DEFAULT_BLOCK_SIZE, "_scale_inv")
    if qc.get("quant_method") == "compressed-tensors":
        scheme = schemes.ct_scheme(qc)
        if scheme:
            return SourceFormat(scheme, nx.DEFAULT_BLOCK_SIZE, "_scale")
        groups = list((qc.get("config_groups") or {}).values())
        w = (groups[0].get("weights") or {}) if groups else {}
        if w.get("strategy") != "block" or w.get("num_bits") != 8:
            raise ConvertError(f"compressed-tensors source with weights {w}: only FP8 block is read here")
        return SourceFormat("fp8-ct", tuple(w.get("block_structure") or nx.DEFAULT_BLOCK_SIZE), "_scale")
    fp8 = [n for n, i in tensors.items() if i.dtype in FP8_DTYPES]
    if not fp8:
        return SourceFormat("unquantized", nx.DEFAULT_BLOCK_SIZE, "_scale_inv")
    block = tuple(qc.get("weight_block_size") or nx.DEFAULT_BLOCK_SIZE)
    return SourceFormat("fp8-block", block, "_scale_inv")


def _nvfp4_outputs(name: str, shape: tuple[int, ...], ct: bool) -> list[OutEntry]:
    """ModelOpt: the weight as it is named (3D fused experts whole, one scale_2 per expert);
    compressed-tensors: per module, fused 3D experts per expert and projection (fp8norm.schemes)."""
    packed_shape = (*shape[:-1], shape[-1] // 2)
    scale_shape = (*shape[:-1], shape[-1] // NVFP4_GROUP)
    global_shape = tuple(shape[:-2]) if len(shape) == 3 else ()
    if ct:
        modules = schemes.output_modules(name, shape)
        rows = shape[-2] * (shape[0] if len(shape) == 3 else 1) // len(modules)
        return [e for m in modules for e in (OutEntry(f"{m}.weight_packed", "U8", (rows, shape[-1] // 2)),
                                             OutEntry(f"{m}.weight_scale", "F8_E4M3", (rows, shape[-1] // NVFP4_GROUP)),
                                             OutEntry(f"{m}.weight_global_scale", "F32", (1,)))]
    return [OutEntry(name, "U8", packed_shape), OutEntry(name + "_scale", "F8_E4M3", scale_shape),
            OutEntry(name + "_scale_2", "F32", global_shape)]


def nvfp4_members(tensors: dict, kind: str) -> dict[str, tuple[str, str, str]]:
    """NVFP4 weights of a source: packed name -> (block scale, global scale, dequantized name)."""
    out = {}
    for n, i in tensors.items():
        if i.dtype != "U8":
            continue
        if kind == "nvfp4" and n + "_scale" in tensors and n + "_scale_2" in tensors:
            out[n] = (n + "_scale", n + "_scale_2", n)
        elif kind == "nvfp4-ct" and n.endswith(".weight_packed"):
            m = n.removesuffix(".weight_packed")
            if m + ".weight_scale" in tensors and m + ".weight_global_scale" in tensors:
                out[n] = (m + ".weight_scale", m + ".weight_global_scale", m + ".weight")
    return out


def build_convert_plan(src, to: str, *, keep_unaligned: bool = False, max_shard_size="4GB",
                       repack: bool = True) -> Plan:
    if to not in TARGETS:
        raise ConvertError(f"--to {to!r}: expected one of {', '.join(TARGETS)}")
    ckpt = open_checkpoint(src)
    cfg_path = Path(src) / "config.json"
    config = read_json(cfg_path, "config.json") if cfg_path.exists() else {}
    config_block_size(config, cfg_path)  # checks quantization_config before detect_source reads it
    fmt = detect_source(ckpt.tensors, config)
    tensors = ckpt.tensors
    nvfp4 = nvfp4_members(tensors, fmt.kind) if fmt.kind in NVFP4_SOURCES else {}
    if nvfp4 and to not in ("bf16", "fp16"):
        raise ConvertError(f"{src}: an NVFP4 checkpoint ({'ModelOpt' if fmt.kind == 'nvfp4' else 'compressed-tensors'} "
                           f"layout) converts to bf16 or fp16 only, not {to}")
    nvfp4_parts = {p for parts in nvfp4.values() for p in parts[:2]}
    scale_of = {n: n + fmt.scale_suffix for n, i in tensors.items()
                if i.dtype in FP8_DTYPES and n + fmt.scale_suffix in tensors and n not in nvfp4_parts}
    if fmt.kind == schemes.MXFP4:  # packed E2M1 bytes are U8: weight_packed -> weight_scale
        scale_of = {n: n.removesuffix("_packed") + "_scale" for n in tensors
                    if n.endswith(".weight_packed") and n.removesuffix("_packed") + "_scale" in tensors}
    missing = [n for n, i in tensors.items() if i.dtype in FP8_DTYPES and n not in scale_of and n not in nvfp4_parts]
    if missing:
        raise ConvertError(f"{tensors[missing[0]].file.name}: FP8 tensor {missing[0]!r} has no "
                           f"{missing[0]}{fmt.scale_suffix} ({len(missing)} such tensor(s))")
    if fmt.kind in schemes.CT_SCHEMES:
        schemes.check_sources(ckpt, scale_of, fmt.kind)
    else:
        check_fp8_sources(ckpt, scale_of, fmt.block_size)
    consumed = set(scale_of.values()) | nvfp4_parts
    if fmt.kind in schemes.CT_SCHEMES and to not in ("bf16", "fp16"):
        raise ConvertError(f"{src}: is {fmt.kind}; it converts to bf16 or fp16 only")
    if to in ("bf16", "fp16", "fp8", "fp8-ue8m0", "fp8-ct") and not scale_of and not nvfp4:
        raise ConvertError(f"{src}: holds no FP8 weights to convert to {to} (use `fp8norm quantize` for bf16)")
    if to == "fp8" and fmt.kind != "fp8-ct":
        raise ConvertError(f"{src}: is already block FP8 in the DeepSeek/transformers layout")
    tf = Convert(to, tensors)
    plans, candidates, unaligned = [], [], []
    for name, info in tensors.items():
        if name in consumed:
            continue
        scale = scale_of.get(name)
        inputs = (name, *nvfp4[name][:2]) if name in nvfp4 else (name, scale) if scale else ()
        candidate = bool(scale) or (fmt.kind == "unquantized" and _nvfp4_candidate(name, info))
        if name in nvfp4:
            decision, rule = DEQUANT_NVFP4, f"nvfp4->{to}"
        elif scale and to in ("bf16", "fp16"):
            decision, rule = DEQUANT, f"{'fp8' if fmt.kind not in schemes.CT_SCHEMES else fmt.kind}->{to}"
        elif candidate and to in schemes.CT_SCHEMES:
            kept = schemes.kept_reason(to, name, info.shape)
            decision, rule = (KEEP, kept) if kept else (SCHEME, f"{'fp8' if scale else 'bf16'}->{to}")
        elif scale and to in ("fp8", "fp8-ct"):
            decision, rule = RELABEL, f"fp8-layout->{to}"
        elif scale and to == "fp8-ue8m0":
            decision, rule = UE8M0, "fp8->fp8-ue8m0"
        elif candidate and to.startswith("nvfp4"):
            if info.shape[-1] % NVFP4_GROUP:
                decision, rule = KEEP, "nvfp4:unaligned-kept"
                unaligned.append(name)
            elif to == "nvfp4-ct" and (kept := schemes.kept_reason(to, name, info.shape)):
                decision, rule = KEEP, kept  # 3D, not fused experts (those are written per expert)
            else:
                decision, rule = NVFP4, f"{'fp8' if scale else 'bf16'}->{to}"
        else:  # every target takes an FP8 weight with its scale (above): this one is not quantized
            decision, rule = KEEP, "not-quantized"
        t = TensorPlan(name, info.dtype, info.shape, decision, rule, info.file.name, [], inputs=inputs,
                       extra_in_bytes=sum(tensors[n].nbytes for n in inputs[1:]))
        t.outputs = tf.outputs(t)
        plans.append(t)
        if candidate:
            candidates.append(t)
    if to in schemes.CT_SCHEMES:
        schemes.keep_fused_partners(candidates, SCHEME, tf)
    if unaligned and not keep_unaligned:
        i = tensors[unaligned[0]]
        raise ConvertError(f"{i.file.name}: tensor {unaligned[0]!r} {list(i.shape)}: input dimension not a multiple "
                           f"of {NVFP4_GROUP} ({len(unaligned)} such tensor(s)); --keep-unaligned keeps them as they are")
    max_bytes = parse_size(max_shard_size)
    repacked = repack or not ckpt.standard_names
    shards = lay_out_shards(plans, repacked, max_bytes)
    settings = QuantSettings(block_size=fmt.block_size, scale_fmt="ue8m0" if to == "fp8-ue8m0" else "float")
    return Plan(Path(src), settings, plans, shards, repacked, max_bytes, None, ckpt, convert_to=to,
                source_format=fmt)


def _nvfp4_candidate(name: str, info) -> bool:
    """bf16 sources: the linears `quantize` would make FP8 become NVFP4."""
    rule = heuristic_rule(name)
    return rule.decision == FP8 and quantizable(info, (NVFP4_GROUP, NVFP4_GROUP)) is None


def nvfp4_global_amax(plan: Plan, device: torch.device) -> dict[str, torch.Tensor]:
    """Pre-pass: amax of every NVFP4 tensor, then the max over each fused group (one read of each)."""
    amax = {}
    for t in plan.tensors:
        if t.decision != NVFP4:
            continue
        xs = [read_tensor(plan.checkpoint.tensors[n]).to(device) for n in t.input_names]
        amax[t.name] = dispatch.nvfp4_amax(xs[0], src_scale_inv=xs[1] if len(xs) > 1 else None,
                                           src_block_size=plan.source_format.block_size).cpu()
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name in amax:
        key = fused_group_key(name)
        if key is not None:
            groups[key].append(name)
    for names in groups.values():
        joint = torch.stack([amax[n] for n in names]).amax(0)
        for n in names:
            amax[n] = joint
    return amax


def requant_summary(errors: list[tuple[str, float, float]]) -> str:
    """One line for every tensor requantized to power-of-two scales (thousands on a real MoE)."""
    rels = sorted(e[1] for e in errors)
    worst = max(errors, key=lambda e: e[1])
    return (f"requant   {len(errors)} tensor(s) requantized to power-of-two scales: relative L2 error vs the "
            f"FP8 source median {rels[len(rels) // 2]:.2e}, max {worst[1]:.2e} ({worst[0]}); max abs "
            f"{max(e[2] for e in errors):.2e}")


def _converted_modules(plan: Plan) -> list[str]:
    return sorted(schemes.module_of(t.name) for t in plan.tensors if t.decision != KEEP)


def _ct_ignore(plan: Plan) -> list[str]:
    """Class targets (`Linear`) select every linear; the kept ones are ignored by collapsed patterns.
    (One `re:^exact$` target per module made compressed-tensors' matching quadratic: minutes for a
    few thousand linears.)"""
    return schemes.ignore_patterns(_kept_weight_modules(plan), _converted_modules(plan))


def _kept_weight_modules(plan: Plan) -> list[str]:
    """Every module whose `.weight` stays unquantized, whatever its rank: compressed-tensors' name-based
    readers take any `X.weight` (X not ending in "norm") for a Linear under a `Linear` target."""
    return sorted(t.name.removesuffix(".weight") for t in plan.tensors
                  if t.decision == KEEP and t.name.endswith(".weight") and t.dtype not in FP8_DTYPES)


def target_config(cfg: dict, plan: Plan) -> dict:
    """config.json for the target format."""
    cfg = dict(cfg)
    to = plan.convert_to
    cfg.pop("quantization_config", None)
    bm, bn = plan.source_format.block_size
    if to in ("bf16", "fp16"):
        return cfg
    if to in ("fp8", "fp8-ue8m0"):
        qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [bm, bn],
              "modules_to_not_convert": plan.kept_linear_modules()}
        if to == "fp8-ue8m0":
            qc["scale_fmt"] = "ue8m0"
        cfg["quantization_config"] = qc
        return cfg
    if to == "fp8-ct":
        weights = {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [bm, bn],
                   "symmetric": True, "dynamic": False}
        acts = {"num_bits": 8, "type": "float", "strategy": "group", "group_size": bn, "symmetric": True,
                "dynamic": True}
        cfg["quantization_config"] = _ct_config("float-quantized", weights, acts, plan)
        return cfg
    if to in schemes.CT_SCHEMES:
        cfg["quantization_config"] = ct_quantization_config(to, plan)
        return cfg
    if to == "nvfp4-ct":
        weights = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": NVFP4_GROUP,
                   "symmetric": True, "dynamic": False}
        cfg["quantization_config"] = _ct_config("nvfp4-pack-quantized", weights, None, plan)
        return cfg
    cfg["quantization_config"] = modelopt_config_json(plan)
    return cfg


def _ct_config(fmt: str, weights: dict, acts: dict | None, plan: Plan) -> dict:
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": acts, "output_activations": None, "format": fmt}},
            "ignore": _ct_ignore(plan), "kv_cache_scheme": None}


def ct_quantization_config(scheme: str, plan: Plan) -> dict:
    """quantization_config of a checkpoint in one of fp8norm.schemes' compressed-tensors layouts."""
    weights, acts = schemes.ct_scheme_args(scheme)
    return _ct_config(schemes.CT_FORMAT[scheme], weights, acts, plan)


# Weight-only NVFP4 (no `input_scale`: activations stay bf16/fp16), as ModelOpt names it
# (QUANTIZATION_W4A16_NVFP4 in modelopt/torch/export/model_config.py) and vLLM serves it
# (ModelOptNvFp4Config: "W4A16_NVFP4" -> the Marlin W4A16 linear method). "NVFP4" declares W4A4, whose
# input scales these files do not hold.
MODELOPT_QUANT_ALGO = "W4A16_NVFP4"


def modelopt_exclusions(plan: Plan) -> list[str]:
    """The linears left unquantized, lm_head always among them unless quantized (tied embeddings have no
    lm_head.weight, but the model has the Linear). A name that is a substring of a quantized module's
    (vLLM also excludes by substring) is written as a one-name wildcard (`mlp.gat[e]`), which matches
    only itself."""
    kept = plan.kept_linear_modules()
    quantized = {schemes.module_of(t.name) for t in plan.tensors if t.decision == NVFP4}
    if "lm_head" not in quantized and "lm_head" not in kept:
        kept.append("lm_head")
    fused = {m.rsplit(".", 1)[0] + "." + f for m in quantized for f in ("qkv_proj", "gate_up_proj")}
    return sorted(k if not any(k in q for q in quantized | fused) else f"{k[:-1]}[{k[-1]}]" for k in kept)


def modelopt_quantization(plan: Plan) -> dict:
    """hf_quant_config.json's `quantization`: vLLM requires group_size, kv_cache_quant_algo and
    exclude_modules there."""
    return {"quant_algo": MODELOPT_QUANT_ALGO, "group_size": NVFP4_GROUP, "kv_cache_quant_algo": None,
            "exclude_modules": modelopt_exclusions(plan)}


def modelopt_config_json(plan: Plan) -> dict:
    """config.json's flat `quantization_config` of a ModelOpt NVFP4 output: exclusions under `ignore`,
    the key vLLM reads in this form (`exclude_modules` only under hf_quant_config.json's `quantization`)."""
    return {"quant_method": "modelopt", "quant_algo": MODELOPT_QUANT_ALGO, "group_size": NVFP4_GROUP,
            "kv_cache_scheme": None, "ignore": modelopt_exclusions(plan)}


class Convert(Transform):
    """convert --to: each planned tensor by its decision, config.json and the files of the target format;
    the requantization errors of every rank summed up in one note."""
    skip_files = (PROVENANCE_NAME, HF_QUANT_CONFIG)

    def __init__(self, to: str, tensors: dict):
        super().__init__()
        self.to, self.tensors = to, tensors

    def outputs(self, t: TensorPlan) -> list[OutEntry]:
        name, shape, to = t.name, t.shape, self.to
        if t.decision in (DEQUANT, DEQUANT_NVFP4):  # a packed (U8) source holds two 4-bit values a byte
            return [OutEntry(name.removesuffix("_packed"), "BF16" if to == "bf16" else "F16",
                             (*shape[:-1], 2 * shape[-1]) if t.dtype == "U8" else shape)]
        if t.decision == SCHEME:
            return schemes.output_entries(name, shape, to)
        if t.decision == NVFP4:
            return _nvfp4_outputs(name, shape, to == "nvfp4-ct")
        scales = [OutEntry(n, self.tensors[n].dtype, self.tensors[n].shape) for n in t.inputs[1:]]
        if t.decision in (RELABEL, UE8M0):
            scales = [OutEntry(name + ("_scale" if to == "fp8-ct" else "_scale_inv"), scales[0].dtype, scales[0].shape)]
        return [OutEntry(name, t.dtype, shape), *scales]  # KEEP: with the scale of an FP8 weight

    def apply(self, t, xs, plan, device):
        """A requantized tensor's (name, relative L2 error, max abs error) goes to `records`."""
        block = plan.source_format.block_size
        out_dtype = torch.bfloat16 if t.outputs[0].dtype == "BF16" else torch.float16  # of a dequantized tensor
        if t.decision in (KEEP, RELABEL):
            return xs
        if t.decision == NVFP4:  # bf16, or FP8 dequantized in the same pass, with the joint amax
            packed, wscale, wscale2 = dispatch.quant_nvfp4(
                xs[0].to(device), global_amax=plan.global_amax[t.name].to(device),
                src_scale_inv=xs[1].to(device) if len(xs) > 1 else None, src_block_size=block)
            if self.to == "nvfp4-ct":  # compressed-tensors stores 1 / scale_2, per module (fused experts split)
                inv = torch.reciprocal(wscale2).reshape(-1)
                per_expert = len(t.outputs) // 3 // inv.numel()  # projections of a fused expert share its scale
                return [o.contiguous().cpu() for trio in zip(schemes.split_source(t.name, packed),
                                                             schemes.split_source(t.name, wscale),
                                                             inv.repeat_interleave(per_expert).split(1))
                        for o in trio]
            return [packed.cpu(), wscale.cpu(), wscale2.cpu()]
        if t.decision == DEQUANT_NVFP4:
            packed, wscale, wscale2 = (x.to(device) for x in xs)
            if plan.source_format.kind == "nvfp4-ct":  # compressed-tensors stores 1 / ModelOpt's scale_2
                wscale2 = torch.reciprocal(wscale2.float()).reshape(wscale2.shape[:-1])
            return [dispatch.dequant_nvfp4(packed, wscale, wscale2, out_dtype=out_dtype).cpu()]
        if t.decision == SCHEME:
            try:
                outs = schemes.quantize_weight(self.to, xs[0].to(device),
                                               src_scale_inv=xs[1].to(device) if len(xs) > 1 else None,
                                               src_block_size=block, rule=plan.mx_rule, name=t.name)
            except ValueError as e:
                raise ValueError(f"{t.source_file}: tensor {t.name!r}: {e}") from None
            return [o.cpu() for o in outs]
        q, scale = xs[0].to(device), xs[1].to(device)
        if t.decision == DEQUANT:
            if plan.source_format.kind in schemes.CT_SCHEMES:
                return [schemes.dequantize_weight(plan.source_format.kind, q, scale, out_dtype).cpu()]
            return [dispatch.dequant_fp8_block(q, scale, block_size=block, out_dtype=out_dtype).cpu()]
        if t.decision == UE8M0:
            if nx.is_power_of_two(scale):
                return xs  # already powers of two: the bytes are relabelled, nothing is requantized
            scale_dtype = scale.dtype if scale.dtype in (torch.float32, torch.bfloat16) else torch.float32
            q2, s2 = dispatch.quant_fp8_block(q, block_size=block, scale_fmt="ue8m0", scale_dtype=scale_dtype,
                                              x_scale_inv=scale)
            before = dispatch.dequant_fp8_block(q, scale, block_size=block, out_dtype=torch.float32)
            after = dispatch.dequant_fp8_block(q2, s2, block_size=block, out_dtype=torch.float32)
            rel = float((after - before).norm() / before.norm().clamp_min(1e-30))
            max_abs = float((after - before).abs().max())
            self.records.append((t.name, rel, max_abs))
            return [q2.cpu(), s2.cpu()]
        raise AssertionError(t.decision)

    config = staticmethod(target_config)

    def extra_files(self, plan):
        files = {PROVENANCE_NAME: json_text(provenance(converted_to=self.to, source_format=plan.source_format.kind,
                                                       **({"mx_rule": plan.mx_rule} if plan.mx_rule else {}),
                                                       plan_fingerprint=plan.fingerprint()))}
        if self.to == "nvfp4":
            files[HF_QUANT_CONFIG] = json.dumps({"producer": {"name": "modelopt", "version": f"fp8norm-{__version__}"},
                                                 "quantization": modelopt_quantization(plan)}, indent=2) + "\n"
        return files

    def notes(self):
        return [requant_summary(self.records)] if self.records else []


def target_of(to: str, scale_fmt: str | None) -> str:
    """`to` with `scale_fmt` folded in: fp8 + ue8m0 is the target fp8-ue8m0; ue8m0 applies to fp8 only."""
    if scale_fmt in (None, "float") or to == "fp8-ue8m0":
        return to
    if scale_fmt != "ue8m0":
        raise ConvertError(f"--scale-fmt {scale_fmt!r}: expected float or ue8m0")
    if to != "fp8":
        raise ConvertError(f"--scale-fmt ue8m0 applies to --to fp8 (block FP8 with power-of-two scales), not --to {to}")
    return "fp8-ue8m0"


def convert(src, dst, *, to: str, scale_fmt: str | None = None, keep_unaligned=False, max_shard_size="4GB",
            repack=True, device="auto", resume=False, overwrite=False, progress=None, verify_samples=5,
            mx_rule: str | None = None) -> RunSummary:
    """Convert the checkpoint in `src` to format `to` in `dst` (see the module docstring).

    `scale_fmt="ue8m0"` with `to="fp8"`: power-of-two scales (the same as `to="fp8-ue8m0"`).
    `mx_rule` (mxfp8 / mxfp4 only): the E8M0 scale rule, see fp8norm.kernels.numerics.mx [default: rceil].

    `verify_samples` requantized tensors (to ue8m0 scales, a scheme or NVFP4) of each shard are re-read
    from disk and checked against the dequantized source, as `fp8norm verify` does (summary.verify;
    0 = no check); a FAIL is recorded in DST/fp8norm.json."""
    to = target_of(to, scale_fmt)
    mx_rule = schemes.mx_rule_of(to, mx_rule)
    plan = build_convert_plan(src, to, keep_unaligned=keep_unaligned, max_shard_size=max_shard_size,
                              repack=repack)
    plan.mx_rule = mx_rule
    if to.startswith("nvfp4"):
        plan.global_amax = nvfp4_global_amax(plan, resolve_device(device))
    if not any(t.decision in (UE8M0, SCHEME, NVFP4) for t in plan.tensors):
        verify_samples = 0  # nothing rounded anew (dequantized, relabelled)
    return execute_plan(plan, Path(dst), transform=Convert(to, plan.checkpoint.tensors), device=device,
                        resume=resume, overwrite=overwrite, progress=progress, verify_samples=verify_samples)
