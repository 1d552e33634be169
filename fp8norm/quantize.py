"""`quantize`, `plan` and `repack`: the library functions behind the CLI commands of the same names."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from . import schemes
from .classify import FP8, KEEP
from . import output
from .output import PROVENANCE_NAME, json_text
from .pipeline import RunSummary, execute_plan
from .plan import NONFINITE_FUSED_RULE, NONFINITE_RULE, Plan, PlanOptions, build_plan, lay_out_shards


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


def _with_quantization_config(cfg: dict, plan: Plan) -> dict:
    cfg = dict(cfg)
    if plan.scheme != schemes.BLOCK:
        from .convert import ct_quantization_config

        cfg["quantization_config"] = ct_quantization_config(plan.scheme, plan)
        return cfg
    cfg["quantization_config"] = quantization_config(plan)
    return cfg


def plan(src, options: PlanOptions | None = None, **kwargs) -> Plan:
    """The dry run: every tensor's decision and rule, and the output layout; nothing is written.
    `options` (a PlanOptions) and/or its fields as keyword arguments (reference, include, exclude,
    scale_fmt, calib, max_shard_size, scheme, ...; keywords override `options`). `scheme`: fp8-block
    (default), fp8-channel, mxfp8 or mxfp4 (see fp8norm.schemes)."""
    o = replace(options, **kwargs) if options is not None else PlanOptions(**kwargs)
    if schemes.check_scheme(o.scheme) == schemes.BLOCK:
        return build_plan(src, o)
    if o.calib != "max" or o.activation_stats or o.scale_dtype or o.scale_fmt:
        raise ValueError(f"--scheme {o.scheme}: --calib, --activation-stats, --scale-fmt and --scale-dtype apply "
                         "to fp8-block only")
    p = build_plan(src, o)
    schemes.apply_to_plan(p, o.scheme)
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
    block = p.scheme == schemes.BLOCK
    summary = execute_plan(p, Path(dst), transform=None if block else schemes.quantize_tensor,
                           finalize_config=_with_quantization_config, device=device,
                           resume=resume, overwrite=overwrite, progress=progress,
                           extra_files={PROVENANCE_NAME: provenance(p)},
                           verify_samples=verify_samples if block else 0)
    summary.notes.extend(f"non-finite {t.source_file}: tensor {t.name!r} holds NaN/Inf: kept unquantized"
                         for t in p.tensors if t.rule == NONFINITE_RULE)
    summary.notes.extend(f"non-finite kept {t.name!r} too (fused with a non-finite tensor)"
                         for t in p.tensors if t.rule == NONFINITE_FUSED_RULE)
    return summary


def provenance(p: Plan) -> str:
    """fp8norm.json: how this checkpoint was made (tool version, scales, calibration)."""
    s = p.settings
    return json_text(output.provenance(
        scheme=p.scheme,
        weight_block_size=list(s.block_size), scale_fmt=s.scale_fmt, scale_dtype=s.scale_dtype,
        amax_floor=s.amax_floor, calibration=s.calib.to_dict(), activation_stats_sha256=s.activation_stats_sha256,
        reference=p.reference, plan_fingerprint=p.fingerprint()))


def repack(src, dst, *, max_shard_size="4GB", resume=False, overwrite=False, progress=None) -> RunSummary:
    """Re-shard any safetensors directory into model-NNNNN-of-NNNNN files with an index; no quantization."""
    p = build_plan(src, exclude=(".*",), max_shard_size=max_shard_size, repack=True)
    for t in p.tensors:
        if t.decision == KEEP:
            t.rule = "repack"
    return execute_plan(p, Path(dst), device="cpu", resume=resume, overwrite=overwrite, progress=progress)
