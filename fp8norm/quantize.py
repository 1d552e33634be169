"""`quantize`, `plan` and `repack`: the library functions behind the CLI commands of the same names."""

from __future__ import annotations

from pathlib import Path

import torch

from . import schemes
from .calibrate import CalibSettings
from .plan import lay_out_shards
from .st_io import OutEntry, read_tensor

from .classify import FP8, KEEP, fused_group_key
from . import output
from .output import PROVENANCE_NAME, json_text
from .pipeline import RunSummary, execute_plan
from .plan import Plan, build_plan
from .sizes import parse_size


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


def plan(src, *, reference=None, include=(), exclude=(), allow_mismatch=False, scale_fmt=None,
         scale_dtype=None, amax_floor=None, max_shard_size="4GB", repack=True, calib="max", rms_factor=3.0,
         percentile=99.9, mse_grid=50, activation_stats=None, scheme="fp8-block") -> Plan:
    """The dry run: every tensor's decision and rule, and the output layout; nothing is written.
    `scheme`: fp8-block (default), fp8-channel, mxfp8 or mxfp4 (see fp8norm.schemes)."""
    if schemes.check_scheme(scheme) != schemes.BLOCK and (calib != "max" or activation_stats or scale_dtype
                                                          or scale_fmt):
        raise ValueError(f"--scheme {scheme}: --calib, --activation-stats, --scale-fmt and --scale-dtype apply "
                         "to fp8-block only")
    p = build_plan(src, reference=reference, include=tuple(include), exclude=tuple(exclude),
                   allow_mismatch=allow_mismatch, scale_fmt=scale_fmt, scale_dtype=scale_dtype,
                   amax_floor=amax_floor, max_shard_size=parse_size(max_shard_size), repack=repack,
                   calib=CalibSettings(calib, rms_factor, percentile, mse_grid),
                   activation_stats=activation_stats)
    if scheme != schemes.BLOCK:
        schemes.apply_to_plan(p, scheme)
        p.shards = lay_out_shards(p.tensors, p.repacked, p.max_shard_size)
    return p


def quantize(src, dst, *, device="auto", resume=False, overwrite=False, progress=None, verify_samples=5,
             allow_nonfinite=False, **plan_kwargs) -> RunSummary:
    """Turn the bf16/fp16 checkpoint in `src` into an FP8 block-scaled checkpoint in `dst`.

    `plan_kwargs` are those of `plan()` (reference, include, exclude, scale_fmt, calib, ...).
    `verify_samples` FP8 tensors of each shard are re-read from disk and compared with the source
    (0: skip); the report is in the returned summary. `allow_nonfinite` first scans the tensors to
    quantize and keeps those holding NaN/Inf unquantized (listed in the summary) instead of failing.
    """
    p = plan(src, **plan_kwargs)
    if allow_nonfinite:
        _keep_nonfinite(p)
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
                         for t in p.tensors if t.rule == NONFINITE_RULE + ":fused-with-it")
    return summary


NONFINITE_RULE = "nonfinite-kept"


def _keep_nonfinite(p: Plan) -> None:
    """Re-plan FP8 tensors holding NaN or Inf as kept (one read of each), with the other members of
    their fused module (q/k/v, gate/up stay all-or-none), then lay out shards again."""
    bad = {t.name for t in p.tensors
           if t.decision == FP8 and not bool(torch.isfinite(read_tensor(p.checkpoint.tensors[t.name])).all())}
    bad_groups = {fused_group_key(n) for n in bad} - {None}
    for t in p.tensors:
        if t.name in bad or (t.decision == FP8 and fused_group_key(t.name) in bad_groups):
            t.decision, t.outputs = KEEP, [OutEntry(t.name, t.dtype, t.shape)]
            t.rule = NONFINITE_RULE if t.name in bad else NONFINITE_RULE + ":fused-with-it"
    p.shards = lay_out_shards(p.tensors, p.repacked, p.max_shard_size)


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
    p = build_plan(src, exclude=(".*",), max_shard_size=parse_size(max_shard_size), repack=True)
    for t in p.tensors:
        if t.decision == KEEP:
            t.rule = "repack"
    return execute_plan(p, Path(dst), device="cpu", resume=resume, overwrite=overwrite, progress=progress)
