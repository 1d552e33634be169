"""`quantize`, `plan` and `repack`: the library functions behind the CLI commands of the same names."""

from __future__ import annotations

from pathlib import Path

from .classify import FP8, KEEP
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
    qc["modules_to_not_convert"] = [t.name[: -len(".weight")] for t in plan.tensors
                                    if t.decision == KEEP and len(t.shape) == 2 and t.name.endswith(".weight")]
    return qc


def _with_quantization_config(cfg: dict, plan: Plan) -> dict:
    cfg = dict(cfg)
    cfg["quantization_config"] = quantization_config(plan)
    return cfg


def plan(src, *, reference=None, include=(), exclude=(), allow_mismatch=False, scale_fmt=None,
         scale_dtype=None, amax_floor=None, max_shard_size="4GB", repack=True) -> Plan:
    """The dry run: every tensor's decision and rule, and the output layout; nothing is written."""
    return build_plan(src, reference=reference, include=tuple(include), exclude=tuple(exclude),
                      allow_mismatch=allow_mismatch, scale_fmt=scale_fmt, scale_dtype=scale_dtype,
                      amax_floor=amax_floor, max_shard_size=parse_size(max_shard_size), repack=repack)


def quantize(src, dst, *, reference=None, include=(), exclude=(), allow_mismatch=False, scale_fmt=None,
             scale_dtype=None, amax_floor=None, max_shard_size="4GB", repack=True, device="auto",
             resume=False, overwrite=False, progress=None) -> RunSummary:
    """Turn the bf16/fp16 checkpoint in `src` into an FP8 block-scaled checkpoint in `dst`."""
    p = plan(src, reference=reference, include=include, exclude=exclude, allow_mismatch=allow_mismatch,
             scale_fmt=scale_fmt, scale_dtype=scale_dtype, amax_floor=amax_floor,
             max_shard_size=max_shard_size, repack=repack)
    if not any(t.decision == FP8 for t in p.tensors):
        raise ValueError(f"{src}: no tensor would be quantized (see `fp8norm plan {src}`)")
    return execute_plan(p, Path(dst), finalize_config=_with_quantization_config, device=device,
                        resume=resume, overwrite=overwrite, progress=progress)


def repack(src, dst, *, max_shard_size="4GB", resume=False, overwrite=False, progress=None) -> RunSummary:
    """Re-shard any safetensors directory into model-NNNNN-of-NNNNN files with an index; no quantization."""
    p = build_plan(src, exclude=(".*",), max_shard_size=parse_size(max_shard_size), repack=True)
    for t in p.tensors:
        if t.decision == KEEP:
            t.rule = "repack"
    return execute_plan(p, Path(dst), device="cpu", resume=resume, overwrite=overwrite, progress=progress)
