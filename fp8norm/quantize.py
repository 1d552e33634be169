"""`quantize`, `plan` and `repack`: the library functions behind the CLI commands of the same names."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from . import formats
from .formats.compressed_tensors import Scheme, apply_to_plan
from .classify import FP8, KEEP
from . import output
from .output import PROVENANCE_NAME, json_text
from .pipeline import BlockQuantize, RunSummary, Transform, execute_plan
from .plan import Plan, PlanOptions, build_plan, lay_out_shards


def quantization_config(plan: Plan) -> dict:
    """config.json's quantization_config for an FP8 block checkpoint (transformers/vLLM "fp8")."""
    s = plan.settings
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
          "weight_block_size": list(s.block_size)}
    if s.scale_fmt == "ue8m0":
        qc["scale_fmt"] = "ue8m0"  # every scale written is an exact power of two
    # Unquantized linear modules, so loaders do not build FP8 layers for them.
    qc["modules_to_not_convert"] = plan.kept_linear_modules()
    return qc


class Quantize(BlockQuantize):
    """quantize: block FP8, config.json's quantization_config, fp8norm.json."""

    def config(self, cfg, plan):
        return {**cfg, "quantization_config": quantization_config(plan)}

    def extra_files(self, plan):
        return {PROVENANCE_NAME: provenance(plan)}


# the `scheme` values plan() takes: block FP8 and the compressed-tensors schemes `quantize --to` makes
SCHEMES = tuple(f.kind for f in formats.FORMATS.values() if f.from_bf16 and f.from_bf16[0] == "quantize"
                and len(f.from_bf16) == 3)


class SchemeQuantize(Quantize):
    """quantize --scheme: the tensors planned fp8 in a compressed-tensors scheme (fp8norm.formats)."""

    def __init__(self, fmt: Scheme):
        super().__init__()
        self.format = fmt

    def outputs(self, t):
        return self.format.outputs(t.name, t.shape, t.dtype) if t.decision == FP8 else super().outputs(t)

    def apply(self, t, xs, plan, device):
        if t.decision != FP8:
            return xs
        try:
            outs = self.format.encode(xs[0].to(device), rule=plan.mx_rule, name=t.name)
        except ValueError as e:
            raise ValueError(f"{t.source_file}: tensor {t.name!r}: {e}") from None
        return [o.cpu() for o in outs]

    def config(self, cfg, plan):
        return {**cfg, "quantization_config": self.format.quantization_config(plan)}


def plan(src, options: PlanOptions | None = None, **kwargs) -> Plan:
    """The dry run: every tensor's decision and rule, and the output layout; nothing is written.
    `options` (a PlanOptions) and/or its fields as keyword arguments (reference, include, exclude,
    scale_fmt, calib, max_shard_size, scheme, ...; keywords override `options`). `scheme`: fp8-block
    (default), fp8-channel, mxfp8 or mxfp4 (see fp8norm.formats)."""
    o = replace(options, **kwargs) if options is not None else PlanOptions(**kwargs)
    if o.scheme not in SCHEMES:
        raise ValueError(f"scheme {o.scheme!r}: expected one of {', '.join(SCHEMES)}")
    fmt = formats.get(o.scheme)
    if not isinstance(fmt, Scheme):
        return build_plan(src, o)
    if o.calib != "max" or o.activation_stats or o.scale_dtype or o.scale_fmt:
        raise ValueError(f"--scheme {o.scheme}: --calib, --activation-stats, --scale-fmt and --scale-dtype apply "
                         "to fp8-block only")
    mx_rule = fmt.mx_rule(o.mx_rule, o.scheme)
    p = build_plan(src, o)
    p.mx_rule = mx_rule
    apply_to_plan(p, SchemeQuantize(fmt))
    p.shards = lay_out_shards(p.tensors, p.repacked, p.max_shard_size)
    return p


def quantize(src, dst, *, device="auto", resume=False, overwrite=False, progress=None, verify_samples=5,
             allow_nonfinite=False, **plan_kwargs) -> RunSummary:
    """Turn the bf16/fp16 checkpoint in `src` into an FP8 block-scaled checkpoint in `dst`.

    `plan_kwargs` are those of `plan()` (reference, include, exclude, scale_fmt, calib, ...).
    `verify_samples` FP8 tensors of each shard are re-read from disk and compared with the source
    (0: skip); the report is in the returned summary, and a FAIL is recorded in DST's fp8norm.json.
    `allow_nonfinite` first scans the tensors to quantize and keeps those holding NaN/Inf unquantized
    (listed in the summary) instead of failing.
    """
    p = plan(src, allow_nonfinite=allow_nonfinite, **plan_kwargs)
    if not any(t.decision == FP8 for t in p.tensors):
        raise ValueError(f"{src}: no tensor would be quantized (see `fp8norm plan {src}`)")
    fmt = formats.get(p.scheme)
    return execute_plan(p, Path(dst), transform=SchemeQuantize(fmt) if isinstance(fmt, Scheme) else Quantize(),
                        device=device,
                        resume=resume, overwrite=overwrite, progress=progress, verify_samples=verify_samples)


def provenance(p: Plan) -> str:
    """fp8norm.json: how this checkpoint was made (tool version, scales, calibration)."""
    s = p.settings
    return json_text(output.provenance(
        scheme=p.scheme, **({"mx_rule": p.mx_rule} if p.mx_rule else {}),
        weight_block_size=list(s.block_size), scale_fmt=s.scale_fmt, scale_dtype=s.scale_dtype,
        amax_floor=s.amax_floor, calibration=s.calib.to_dict(), activation_stats_sha256=s.activation_stats_sha256,
        reference=p.reference, plan_fingerprint=p.fingerprint()))


def repack_plan(src, max_shard_size="4GB") -> Plan:
    """The plan of `repack`: every tensor kept as it is, laid out in new shards."""
    p = build_plan(src, exclude=(".*",), max_shard_size=max_shard_size, repack=True)
    for t in p.tensors:
        if t.decision == KEEP:
            t.rule = "repack"
    return p


def repack(src, dst, *, max_shard_size="4GB", resume=False, overwrite=False, progress=None) -> RunSummary:
    """Re-shard any safetensors directory into model-NNNNN-of-NNNNN files with an index; no quantization."""
    return execute_plan(repack_plan(src, max_shard_size), Path(dst), transform=Transform(), device="cpu",
                        resume=resume, overwrite=overwrite, progress=progress)
