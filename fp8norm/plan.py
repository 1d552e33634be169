"""The plan: every tensor's decision, rule and output tensors, and the output shard layout.

`fp8norm plan` prints it; `fp8norm quantize` executes exactly it. Its fingerprint covers everything
that determines the output bytes, so `--resume` can refuse a DST made with other settings.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .kernels.numerics import fp8_block as nx
from . import formats
from .formats.compressed_tensors import LAYOUT as CT_LAYOUT
from .calibrate import CalibSettings
from .checkpoint import (SourceCheckpoint, load_reference_names, open_checkpoint, pack_greedy,
                         shard_name)
from .classify import (FP8, KEEP, PASSTHROUGH, SCALE_SUFFIXES, Choice, Decision, classify, fused_group_key,
                       scale_base, scale_name)
from .output import fingerprint
from .sizes import parse_size
from .source_checks import PlanError, check_fp8_sources  # their home; named here too
from .st_io import DTYPE_NAMES, FP8_DTYPES, OutEntry, read_header, read_tensor

SCALE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
QUANTIZE_DTYPES = ("BF16", "F16", "F32")  # what the kernels make FP8 from


def quantization_config_of(cfg: dict, path) -> dict:
    """config.json's quantization_config ({} when absent), checked to be an object."""
    qc = cfg.get("quantization_config") or {}
    if not isinstance(qc, dict):
        raise PlanError(f"{path}: quantization_config is a {type(qc).__name__}, not an object")
    return qc


def config_block_size(cfg: dict, path) -> tuple[int, int]:
    """The FP8 block size of a checkpoint: quantization_config.weight_block_size, default 128x128."""
    bs = quantization_config_of(cfg, path).get("weight_block_size")
    if bs is None:
        return nx.DEFAULT_BLOCK_SIZE
    if (not isinstance(bs, list) or len(bs) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in bs)):
        raise PlanError(f"{path}: quantization_config.weight_block_size is {bs!r}, not two positive ints")
    return bs[0], bs[1]


def check_patterns(patterns, option: str) -> tuple[str, ...]:
    """Every pattern compiles as a regular expression (else one line naming it and the option)."""
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise PlanError(f"{option} {p!r}: not a regular expression ({e})") from None
    return tuple(patterns)


@dataclass(frozen=True)
class QuantSettings:
    block_size: tuple[int, int] = nx.DEFAULT_BLOCK_SIZE
    scale_fmt: str = "float"
    scale_dtype: str = "float32"
    amax_floor: float = nx.DEFAULT_AMAX_FLOOR
    calib: CalibSettings = CalibSettings()
    activation_stats_sha256: str | None = None  # content hash of --activation-stats, if given

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]


@dataclass
class TensorPlan:
    name: str
    dtype: str
    shape: tuple[int, ...]
    decision: Decision
    rule: str  # why, for display only
    source_file: str
    outputs: list[OutEntry]
    shard: str = ""
    # Source tensors read together for this entry, the first being `name` itself (e.g. an FP8 weight
    # and its scale, which then has no entry of its own); () = (name,).
    inputs: tuple[str, ...] = ()
    extra_in_bytes: int = 0  # bytes of the inputs beyond `name`

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.inputs or (self.name,)

    @property
    def is_fp8_scale(self) -> bool:
        """A passed-through scale of an FP8 weight (it goes with its weight, into the same shard)."""
        return self.decision == PASSTHROUGH and self.dtype not in FP8_DTYPES

    @property
    def nbytes_in(self) -> int:
        return OutEntry(self.name, self.dtype, self.shape).nbytes + self.extra_in_bytes

    @property
    def nbytes_out(self) -> int:
        return sum(o.nbytes for o in self.outputs)


@dataclass
class Plan:
    source: Path
    settings: QuantSettings
    tensors: list[TensorPlan]
    shards: list[str]
    repacked: bool
    max_shard_size: int
    reference: str | None = None
    checkpoint: SourceCheckpoint | None = field(default=None, repr=False)
    activation_stats: dict | None = field(default=None, repr=False)  # module name -> per-channel weights
    # `fp8norm convert` only: the target, the detected source format, NVFP4 joint amaxes
    convert_to: str | None = None
    source_format: object = None
    global_amax: dict | None = field(default=None, repr=False)
    notes: list[str] = field(default_factory=list)  # planning's lines for the summary
    scheme: str = "fp8-block"  # `quantize --scheme` (fp8norm.formats)
    mx_rule: str | None = None  # MX targets: the E8M0 scale rule (fp8norm.kernels.numerics.mx)
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)

    def kept_linear_modules(self) -> list[str]:
        """Modules of 2D weights left unquantized (modules_to_not_convert / ignore / exclude lists)."""
        return sorted(t.name.removesuffix(".weight") for t in self.tensors
                      if t.decision == KEEP and t.name.endswith(".weight") and len(t.shape) == 2
                      and t.dtype not in FP8_DTYPES)

    def totals(self) -> dict:
        count = {d: 0 for d in (FP8, KEEP, PASSTHROUGH)}
        for t in self.tensors:
            count[t.decision] = count.get(t.decision, 0) + 1
        return {"tensors": len(self.tensors), **count,
                "bytes_in": sum(t.nbytes_in for t in self.tensors),
                "bytes_out": sum(t.nbytes_out for t in self.tensors), "shards": len(self.shards)}

    def to_dict(self) -> dict:
        return {
            "source": str(self.source),
            "reference": self.reference,
            "settings": {**asdict(self.settings), "block_size": list(self.settings.block_size),
                         "calib": self.settings.calib.to_dict()},
            "repacked": self.repacked,
            "max_shard_size": self.max_shard_size,
            "shards": self.shards,
            "totals": self.totals(),
            "tensors": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "decision": t.decision,
                         "rule": t.rule, "source_file": t.source_file, "shard": t.shard,
                         "outputs": [{"name": o.name, "dtype": o.dtype, "shape": list(o.shape)}
                                     for o in t.outputs]} for t in self.tensors],
            **({"mx_rule": self.mx_rule} if self.mx_rule else {}),  # same shapes, other bytes
        }

    def fingerprint(self) -> str:
        """Hash of what decides the output bytes (not the source path: a moved source still resumes).
        Computed once, on first use (the whole plan's JSON; a run asks more than once): by then planning
        is over, so edits to the plan (schemes.apply_to_plan, convert's settings) come before it."""
        if self._fingerprint is None:
            d = self.to_dict()
            d.pop("source")
            d.pop("reference")
            self._fingerprint = fingerprint(d)
        return self._fingerprint


def _reference_settings(qcfg: dict, ref_folder: Path, ref_names: set[str]) -> dict:
    """Block size, scale format and scale dtype as the reference checkpoint has them."""
    out = {}
    if qcfg.get("weight_block_size"):
        out["block_size"] = tuple(int(b) for b in qcfg["weight_block_size"])
    if qcfg.get("scale_fmt") == "ue8m0":
        out["scale_fmt"] = "ue8m0"
    scale = next((n for n in sorted(ref_names) if n.endswith("_scale_inv")), None)
    if scale is not None:
        for f in sorted(ref_folder.glob("*.safetensors")):
            infos, _ = read_header(f)
            if scale in infos:
                name = {"F32": "float32", "BF16": "bfloat16"}.get(infos[scale].dtype)
                if name:
                    out["scale_dtype"] = name
                break
    return out


@dataclass(frozen=True)
class PlanOptions:
    """What the user chooses about a quantize plan: the CLI's selection and calibration options, one to
    one, and the library's keyword arguments of `plan()` / `quantize()`."""
    reference: str | Path | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    allow_mismatch: bool = False
    scale_fmt: str | None = None
    scale_dtype: str | None = None
    amax_floor: float | None = None
    max_shard_size: int | str = "4GB"
    repack: bool = True
    calib: str = "max"
    rms_factor: float = 3.0
    percentile: float = 99.9
    mse_grid: int = 50
    activation_stats: str | Path | None = None
    allow_nonfinite: bool = False
    scheme: str = "fp8-block"  # applied by quantize.plan() (fp8norm.formats)
    mx_rule: str | None = None  # mxfp8 / mxfp4: the scale rule [default: fp8norm.kernels.numerics.mx.DEFAULT_RULE]


def build_plan(src: str | Path, options: PlanOptions | None = None, **kwargs) -> Plan:
    """Decide every tensor and lay out the output (`options`, or PlanOptions(**kwargs), or both: the
    keyword arguments then override). `allow_nonfinite`: tensors that would be quantized but hold
    NaN/Inf (one read of each) are kept instead, with the other members of their fused module (q/k/v,
    gate/up stay all-or-none); the plan's notes list them."""
    o = replace(options, **kwargs) if options is not None else PlanOptions(**kwargs)
    reference, include, exclude, repack = o.reference, tuple(o.include), tuple(o.exclude), o.repack
    max_shard_size = parse_size(o.max_shard_size)
    calib = CalibSettings(o.calib, o.rms_factor, o.percentile, o.mse_grid)
    ckpt = open_checkpoint(src)
    settings = {"calib": calib}
    stats = None
    if o.activation_stats is not None and calib.mode == "max":
        raise ValueError("--activation-stats weights the rms and mse calibrations; --calib max (the tile amax) "
                         "does not use it: add --calib mse or --calib rms, or drop --activation-stats")
    if o.activation_stats is not None:
        from .activation_stats import load_activation_stats

        stats, settings["activation_stats_sha256"] = load_activation_stats(o.activation_stats)
    ref_names = None
    if reference is not None:
        ref_names, qcfg, folder = load_reference_names(reference)
        settings.update(_reference_settings(qcfg, folder, ref_names))
    for key, value in (("scale_fmt", o.scale_fmt), ("scale_dtype", o.scale_dtype), ("amax_floor", o.amax_floor)):
        if value is not None:
            settings[key] = value
    qs = QuantSettings(**settings)
    decisions = classify(ckpt.tensors, block_size=qs.block_size, reference_names=ref_names,
                         include=check_patterns(include, "--include"), exclude=check_patterns(exclude, "--exclude"),
                         allow_mismatch=o.allow_mismatch)
    for name, d in decisions.items():
        info = ckpt.tensors[name]
        if d.decision == FP8 and info.dtype not in QUANTIZE_DTYPES:
            raise PlanError(f"{info.file.name}: tensor {name!r} is {info.dtype}: FP8 is made from "
                            f"{', '.join(QUANTIZE_DTYPES)} weights (--exclude it to keep it as it is)")
    check_fp8_sources(ckpt, {n: next(n + s for s in SCALE_SUFFIXES if n + s in ckpt.tensors)
                             for n, i in ckpt.tensors.items() if i.dtype in FP8_DTYPES}, qs.block_size)
    notes = _odd_tensor_notes(ckpt, decisions)
    if o.allow_nonfinite:
        decisions = _keep_nonfinite(ckpt, decisions, notes)
    tensors = []
    for name, info in ckpt.tensors.items():
        d = decisions[name]
        if d.decision == FP8:
            outputs = [OutEntry(name, "F8_E4M3", info.shape),
                       OutEntry(scale_name(name), DTYPE_NAMES[qs.torch_scale_dtype],
                                nx.scale_inv_shape(info.shape, qs.block_size))]
        else:
            outputs = [OutEntry(name, info.dtype, info.shape)]
        tensors.append(TensorPlan(name, info.dtype, info.shape, d.decision, d.rule, info.file.name, outputs))
    tensors = _scales_after_weights(tensors)
    repacked = repack or not ckpt.standard_names
    shards = lay_out_shards(tensors, repacked, max_shard_size)
    return Plan(Path(src), qs, tensors, shards, repacked, max_shard_size,
                None if reference is None else str(reference), ckpt, stats, notes=notes)


def _odd_tensor_notes(ckpt: SourceCheckpoint, decisions: dict) -> list[str]:
    """Lines for tensors planned as asked but likely not as meant: a scale whose weight is not in the
    checkpoint (copied as it is), a 3D weight that is not an expert stack (quantized as stacked matrices)."""
    notes = []
    for name, info in ckpt.tensors.items():
        base = scale_base(name)  # (input_scale, k_scale... belong to no weight)
        if base is not None and base not in ckpt.tensors and (base.endswith(".weight") or name.endswith("_scale_inv")):
            notes.append(f"note      {info.file.name}: {name!r} is named as a scale, but its weight {base!r} is not "
                         "in the checkpoint: copied as it is")
        if decisions[name].decision == FP8 and len(info.shape) == 3 and decisions[name].rule != "fused-experts":
            notes.append(f"note      {info.file.name}: {name!r} is 3D {list(info.shape)} but not an expert stack: "
                         f"quantized as {info.shape[0]} stacked matrices with 3D scales (--exclude it to keep it)")
    return notes


NONFINITE_RULE = "nonfinite-kept"
NONFINITE_FUSED_RULE = NONFINITE_RULE + ":fused-with-it"


def _keep_nonfinite(ckpt: SourceCheckpoint, decisions: dict, notes: list[str]) -> dict:
    bad = [n for n, d in decisions.items()
           if d.decision == FP8 and not bool(torch.isfinite(read_tensor(ckpt.tensors[n])).all())]
    groups = {fused_group_key(n) for n in bad} - {None}
    fused = [n for n, d in decisions.items() if d.decision == FP8 and n not in bad and fused_group_key(n) in groups]
    notes += [f"non-finite {ckpt.tensors[n].file.name}: tensor {n!r} holds NaN/Inf: kept unquantized" for n in bad]
    notes += [f"non-finite kept {n!r} too (fused with a non-finite tensor)" for n in fused]
    return {**decisions, **{n: Choice(KEEP, NONFINITE_RULE) for n in bad},
            **{n: Choice(KEEP, NONFINITE_FUSED_RULE) for n in fused}}


def _scales_after_weights(tensors: list[TensorPlan]) -> list[TensorPlan]:
    """Move each passed-through scale right after its FP8 weight, so both land in one shard."""
    by_name = {t.name: t for t in tensors}
    follows = {}
    for t in tensors:
        if t.is_fp8_scale:
            base = t.name.rsplit("_scale", 1)[0]
            follows.setdefault(base, []).append(t)
    out = []
    for t in tensors:
        if t.is_fp8_scale and t.name.rsplit("_scale", 1)[0] in by_name:
            continue
        out.append(t)
        out.extend(follows.get(t.name, []))
    return out


def _units(tensors: list[TensorPlan]) -> list[list[TensorPlan]]:
    units: list[list[TensorPlan]] = []
    for t in tensors:
        if t.is_fp8_scale and units:
            units[-1].append(t)
        else:
            units.append([t])
    return units


def lay_out_shards(tensors: list[TensorPlan], repacked: bool, max_bytes: int) -> list[str]:
    """Set every tensor's output shard and return the shard names: packed greedily up to `max_bytes`
    (`repacked`), or the source's own files."""
    return _assign_shards(tensors, max_bytes) if repacked else _keep_layout(tensors)


def _assign_shards(tensors: list[TensorPlan], max_bytes: int) -> list[str]:
    """Greedy, in source order: a new shard when the next unit (weight + scales) would overflow."""
    units = _units(tensors)
    numbers = pack_greedy([sum(t.nbytes_out for t in unit) for unit in units], max_bytes)
    n = numbers[-1] + 1 if numbers else 1
    for unit, i in zip(units, numbers):
        for t in unit:
            t.shard = shard_name(i, n)
    return [shard_name(i, n) for i in range(n)]


def _keep_layout(tensors: list[TensorPlan]) -> list[str]:
    for unit in _units(tensors):
        for t in unit:
            t.shard = unit[0].source_file
    return list(dict.fromkeys(t.shard for t in tensors))


def format_plan_table(plan: Plan) -> str:
    """A readable table of every tensor and the totals (what `fp8norm plan` prints)."""
    rows = [(t.name, "x".join(map(str, t.shape)), t.dtype, t.decision, t.rule) for t in plan.tensors]
    head = ("tensor", "shape", "dtype", "decision", "rule")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    line = "  ".join(f"{{:{w}}}" for w in widths)
    out = [line.format(*head), line.format(*("-" * w for w in widths))]
    out += [line.format(*r) for r in rows]
    tot = plan.totals()
    s = plan.settings
    out += ["", f"{tot['tensors']} tensors: {tot[FP8]} fp8, {tot[KEEP]} keep, {tot[PASSTHROUGH]} passthrough",
            f"bytes: {tot['bytes_in']:,} -> {tot['bytes_out']:,} ({tot['bytes_out'] / max(1, tot['bytes_in']):.1%})"
            f" in {tot['shards']} shard(s){' (repacked)' if plan.repacked else ' (source layout)'}",
            f"scales: {s.scale_fmt}, {s.scale_dtype}, blocks {s.block_size[0]}x{s.block_size[1]}, "
            f"amax floor {s.amax_floor:g}, calibration {s.calib.describe()}"
            f"{' weighted by activation stats' if s.activation_stats_sha256 else ''}"]
    if formats.get(plan.scheme).layout == CT_LAYOUT:  # the scheme's own scales, not the block settings
        out[-1] = f"scheme: {plan.scheme} (compressed-tensors layout; see fp8norm/formats/)"
    return "\n".join(out)
