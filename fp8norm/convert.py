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
               per-channel FP8 / OCP MXFP8 / MXFP4 in compressed-tensors layouts (see fp8norm.formats),
               from bf16 or block FP8; `bf16`/`fp16` read them back

NVFP4 sources may be bf16 (the quantize rule table picks the linears) or FP8 (fused dequant ->
NVFP4). q/k/v, gate/up and w1/w3 of one module share one global scale (engines fuse them); a fused
3D expert tensor gets one global scale per expert. Weights whose input dimension is not a multiple
of 16 are an error naming them, or stay as they are with `keep_unaligned`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from . import dispatch, formats
from .kernels.numerics import fp8_block as nx
from .checkpoint import open_checkpoint, read_json
from .classify import FP8, KEEP, Decision, fused_group_key, heuristic_rule, quantizable
from .formats.compressed_tensors import keep_fused_partners
from .output import PROVENANCE_NAME, json_text, provenance
from .device import resolve_device
from .pipeline import RunSummary, Transform, execute_plan
from .plan import Plan, QuantSettings, TensorPlan, config_block_size, lay_out_shards
from .sizes import parse_size
from .st_io import FP8_DTYPES, OutEntry, read_tensor

TARGETS = tuple(formats.FORMATS)
CANDIDATE_TILE = (16, 16)  # a bf16 linear smaller than the smallest scale group (NVFP4's 16) stays as it is

# decisions of a convert plan
DEQUANT, DEQUANT_NVFP4, RELABEL, UE8M0, NVFP4, SCHEME = (Decision.DEQUANT, Decision.DEQUANT_NVFP4, Decision.RELABEL,
                                                         Decision.UE8M0, Decision.NVFP4, Decision.SCHEME)


class ConvertError(ValueError):
    pass


@dataclass(frozen=True)
class SourceFormat:
    format: formats.Format  # the source's format (fp8norm.formats.detect); bf16 for an unquantized one
    block_size: tuple[int, int]

    @property
    def kind(self) -> str:
        """"fp8-block" (weight_scale_inv), "fp8-ct" (weight_scale), "unquantized", or the format's name."""
        return self.format.kind

    @property
    def scale_suffix(self) -> str:
        return self.format.scale_suffix


def detect_source(tensors: dict, config: dict) -> SourceFormat:
    try:
        fmt, block = formats.detect(config, tensors)
    except ValueError as e:
        raise ConvertError(str(e)) from None
    return SourceFormat(fmt, block)


def build_convert_plan(src, to: str, *, keep_unaligned: bool = False, max_shard_size="4GB",
                       repack: bool = True) -> Plan:
    if to not in TARGETS:
        raise ConvertError(f"--to {to!r}: expected one of {', '.join(TARGETS)}")
    ckpt = open_checkpoint(src)
    cfg_path = Path(src) / "config.json"
    config = read_json(cfg_path, "config.json") if cfg_path.exists() else {}
    config_block_size(config, cfg_path)  # checks quantization_config before detect_source reads it
    fmt = detect_source(ckpt.tensors, config)
    source, target = fmt.format, formats.get(to)
    tensors = ckpt.tensors
    members = source.global_scaled_members(tensors)
    member_parts = {p for parts in members.values() for p in parts[:2]}
    scale_of = source.scaled_weights(tensors, skip=member_parts)
    missing = [n for n, i in tensors.items() if i.dtype in FP8_DTYPES and n not in scale_of and n not in member_parts]
    if (refusal := source.refuse_target(src, target, members)) and members:
        raise ConvertError(refusal)
    if missing:
        raise ConvertError(f"{tensors[missing[0]].file.name}: FP8 tensor {missing[0]!r} has no "
                           f"{missing[0]}{fmt.scale_suffix} ({len(missing)} such tensor(s))")
    source.check_sources(ckpt, scale_of, fmt.block_size)
    consumed = set(scale_of.values()) | member_parts
    if refusal:
        raise ConvertError(refusal)
    if not target.quantizes_anew and not scale_of and not members:
        raise ConvertError(f"{src}: holds no FP8 weights to convert to {to} (use `fp8norm quantize` for bf16)")
    if refusal := target.refuse_source(src, source):
        raise ConvertError(refusal)
    tf = Convert(to, tensors, source)
    plans, candidates, unaligned = [], [], []
    for name, info in tensors.items():
        if name in consumed:
            continue
        scale = scale_of.get(name)
        inputs = (name, *members[name][:2]) if name in members else (name, scale) if scale else ()
        candidate = bool(scale) or (source.dense_dtype is not None and _bf16_candidate(name, info))
        if name in members:
            decision, rule = DEQUANT_NVFP4, f"{source.member_rule_label}->{to}"
        else:  # every target takes an FP8 weight with its scale: one it does not is not quantized
            decision, rule = target.convert_decision(name, info, scale, candidate, source) or (KEEP, "not-quantized")
        if rule == target.unaligned_error_rule:
            unaligned.append(name)
        t = TensorPlan(name, info.dtype, info.shape, decision, rule, info.file.name, [], inputs=inputs,
                       extra_in_bytes=sum(tensors[n].nbytes for n in inputs[1:]))
        t.outputs = tf.outputs(t)
        plans.append(t)
        if candidate:
            candidates.append(t)
    keep_fused_partners(candidates, SCHEME, tf)
    if unaligned and not keep_unaligned:
        i = tensors[unaligned[0]]
        raise ConvertError(f"{i.file.name}: tensor {unaligned[0]!r} {list(i.shape)}: input dimension not a multiple "
                           f"of {target.scale_block[-1]} ({len(unaligned)} such tensor(s)); --keep-unaligned keeps "
                           "them as they are")
    max_bytes = parse_size(max_shard_size)
    repacked = repack or not ckpt.standard_names
    shards = lay_out_shards(plans, repacked, max_bytes)
    settings = QuantSettings(block_size=fmt.block_size, scale_fmt=getattr(target, "scale_fmt", "float"))
    return Plan(Path(src), settings, plans, shards, repacked, max_bytes, None, ckpt, convert_to=to,
                source_format=fmt)


def _bf16_candidate(name: str, info) -> bool:
    """bf16 sources: the linears `quantize` would make FP8 are rounded to a scheme or NVFP4."""
    rule = heuristic_rule(name)
    return rule.decision == FP8 and quantizable(info, CANDIDATE_TILE) is None


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


def target_config(cfg: dict, plan: Plan) -> dict:
    """config.json for the target format."""
    cfg = dict(cfg)
    cfg.pop("quantization_config", None)
    qc = formats.get(plan.convert_to).quantization_config(plan)
    return cfg if qc is None else {**cfg, "quantization_config": qc}


class Convert(Transform):
    """convert --to: each planned tensor by its decision, config.json and the files of the target format;
    the requantization errors of every rank summed up in one note."""
    skip_files = (PROVENANCE_NAME, *(n for f in formats.FORMATS.values() for n in f.extra_file_names))

    def __init__(self, to: str, tensors: dict, source: formats.Format):
        super().__init__()
        self.to, self.tensors, self.target, self.source = to, tensors, formats.get(to), source

    def outputs(self, t: TensorPlan) -> list[OutEntry]:
        name, shape = t.name, t.shape
        if t.decision in (DEQUANT, DEQUANT_NVFP4):  # a packed source holds several 4-bit values an element
            return [OutEntry(name.removesuffix("_packed"), self.target.dense_dtype,
                             self.source.unpacked_shape(t.dtype, shape))]
        if t.decision in (SCHEME, NVFP4):
            return self.target.outputs(name, shape, t.dtype)
        scales = [OutEntry(n, self.tensors[n].dtype, self.tensors[n].shape) for n in t.inputs[1:]]
        if t.decision in (RELABEL, UE8M0):
            scales = [OutEntry(name + self.target.scale_suffix, scales[0].dtype, scales[0].shape)]
        return [OutEntry(name, t.dtype, shape), *scales]  # KEEP: with the scale of an FP8 weight

    def apply(self, t, xs, plan, device):
        """A requantized tensor's (name, relative L2 error, max abs error) goes to `records`."""
        block = plan.source_format.block_size
        out_dtype = torch.bfloat16 if t.outputs[0].dtype == "BF16" else torch.float16  # of a dequantized tensor
        if t.decision in (KEEP, RELABEL):
            return xs
        if t.decision in (SCHEME, NVFP4):  # bf16, or FP8 dequantized in the same pass
            x, src_scale_inv = xs[0].to(device), xs[1].to(device) if len(xs) > 1 else None
            amax = plan.global_amax[t.name].to(device) if t.decision == NVFP4 else None
            try:
                outs = self.target.encode(x, name=t.name, src_scale_inv=src_scale_inv, src_block_size=block,
                                          rule=plan.mx_rule, global_amax=amax)
            except ValueError as e:
                raise ValueError(f"{t.source_file}: tensor {t.name!r}: {e}") from None
            return [o.cpu() for o in outs]
        if t.decision in (DEQUANT, DEQUANT_NVFP4):
            xs = [x.to(device) for x in xs]
            return [plan.source_format.format.decode(xs, block, out_dtype).cpu()]
        q, scale = xs[0].to(device), xs[1].to(device)
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
        return {**files, **self.target.extra_files(plan)}

    def notes(self):
        return [requant_summary(self.records)] if self.records else []


def target_of(to: str, scale_fmt: str | None) -> str:
    """`to` with `scale_fmt` folded in: fp8 + ue8m0 is the target fp8-ue8m0; ue8m0 applies to fp8 only."""
    if scale_fmt in (None, "float") or getattr(formats.get(to), "scale_fmt", "float") == scale_fmt:
        return to
    if scale_fmt != "ue8m0":
        raise ConvertError(f"--scale-fmt {scale_fmt!r}: expected float or ue8m0")
    target = formats.made_by("convert", to, "--scale-fmt", scale_fmt)
    if target is None:
        raise ConvertError(f"--scale-fmt ue8m0 applies to --to fp8 (block FP8 with power-of-two scales), not --to {to}")
    return target.name


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
    mx_rule = formats.get(to).mx_rule(mx_rule, to)
    plan = build_convert_plan(src, to, keep_unaligned=keep_unaligned, max_shard_size=max_shard_size,
                              repack=repack)
    plan.mx_rule = mx_rule
    if formats.get(to).needs_global_amax:
        plan.global_amax = nvfp4_global_amax(plan, resolve_device(device))
    if not any(t.decision in (UE8M0, SCHEME, NVFP4) for t in plan.tensors):
        verify_samples = 0  # nothing rounded anew (dequantized, relabelled)
    transform = Convert(to, plan.checkpoint.tensors, plan.source_format.format)
    return execute_plan(plan, Path(dst), transform=transform, device=device, resume=resume, overwrite=overwrite,
                        progress=progress, verify_samples=verify_samples)
