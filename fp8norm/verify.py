"""`fp8norm verify`: how close an FP8 checkpoint is to its source, and whether it is well formed.

Per FP8 tensor: dequantize (fp32/bf16/e8m0 scales, 2D or 3D) and compare with the source tensor:
cosine similarity, mean and max absolute error, each in a GOOD / WARN / FAIL band (defaults from the
Qwen3.5 FP8 toolkit's verifier; configurable). Structure: every FP8 weight has a scale of the right
shape and every scale a weight, kept tensors are byte-identical to the source, the index covers every
tensor exactly once, config.json's quantization_config agrees with the tensors.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import dispatch
from . import numerics as nx
from .checkpoint import INDEX_NAME, CheckpointError, open_checkpoint
from .st_io import FP8_DTYPES, SafetensorsError, TensorInfo, read_tensor

GOOD, WARN, FAIL = "GOOD", "WARN", "FAIL"
_RANK = {GOOD: 0, WARN: 1, FAIL: 2}


@dataclass(frozen=True)
class Bands:
    """GOOD at or beyond the first bound, WARN up to the second, FAIL past it."""
    cos_good: float = 0.9997
    cos_warn: float = 0.9995
    mae_good: float = 0.0008
    mae_warn: float = 0.001
    maxae_good: float = 0.01
    maxae_warn: float = 0.02

    def cos(self, v: float) -> str:
        return GOOD if v >= self.cos_good else WARN if v >= self.cos_warn else FAIL

    def mae(self, v: float) -> str:
        return GOOD if v <= self.mae_good else WARN if v <= self.mae_warn else FAIL

    def maxae(self, v: float) -> str:
        return GOOD if v <= self.maxae_good else WARN if v <= self.maxae_warn else FAIL


def worst(*statuses: str) -> str:
    return max(statuses, key=_RANK.__getitem__, default=GOOD)


@dataclass
class TensorCheck:
    name: str
    shard: str
    cos: float
    mae: float
    maxae: float
    bands: dict
    status: str


def compare(name: str, shard: str, q: torch.Tensor, scale_inv: torch.Tensor, src: torch.Tensor,
            block_size, bands: Bands, chunk_elems: int = 1 << 18) -> TensorCheck:
    """Dequantize q with its scales and measure it against the source tensor, a few row blocks at a
    time (so checking a large tensor costs little memory beside it)."""
    bm = block_size[0]
    dot = nq = nr = abs_sum = 0.0
    maxae = 0.0
    finite = True
    mats = [(q, scale_inv, src)] if q.dim() == 2 else list(zip(q, scale_inv, src))
    for q2, s2, x2 in mats:
        rows = max(bm, chunk_elems // max(1, q2.shape[1]) // bm * bm)
        for r0 in range(0, q2.shape[0], rows):
            deq = dispatch.dequant_fp8_block(q2[r0:r0 + rows], s2[r0 // bm:(r0 + rows) // bm],
                                             block_size=block_size, out_dtype=torch.float32)
            ref = x2[r0:r0 + rows].float()
            finite &= bool(torch.isfinite(deq).all())
            # fp32 elementwise, fp64 sums: exact enough, and no fp64 copies of the chunk
            dot += float((deq * ref).sum(dtype=torch.float64))
            nq += float(deq.square().sum(dtype=torch.float64))
            nr += float(ref.square().sum(dtype=torch.float64))
            diff = deq.sub_(ref).abs_()
            abs_sum += float(diff.sum(dtype=torch.float64))
            maxae = max(maxae, float(diff.max()))
    denom = (nq * nr) ** 0.5
    cos = dot / denom if denom > 0 else float(nq == nr)
    mae = abs_sum / max(1, src.numel())
    b = {"cos": bands.cos(cos), "mae": bands.mae(mae), "maxae": bands.maxae(maxae)}
    if not finite:
        b["finite"] = FAIL
    return TensorCheck(name, shard, cos, mae, maxae, b, worst(*b.values()))


@dataclass
class VerifyReport:
    checks: list[TensorCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # structural, each a FAIL
    fp8_tensors: int = 0
    kept_tensors: int = 0
    calibration: str | None = None

    @property
    def status(self) -> str:
        return worst(FAIL if self.problems else GOOD, *(c.status for c in self.checks))

    def to_dict(self) -> dict:
        return {"status": self.status, "fp8_tensors": self.fp8_tensors, "kept_tensors": self.kept_tensors,
                "checked": len(self.checks), "problems": self.problems, "calibration": self.calibration,
                "tensors": [asdict(c) for c in self.checks]}

    def format(self, bands: Bands = Bands()) -> str:
        n = {s: sum(c.status == s for c in self.checks) for s in (GOOD, WARN, FAIL)}
        lines = ["=" * 72, "  QUANTIZATION VERIFICATION SUMMARY"]
        if self.calibration:
            lines.append(f"  Calibration         : {self.calibration}")
        lines += ["-" * 72,
                  f"  FP8 weight tensors  : {self.fp8_tensors}",
                  f"  Kept tensors        : {self.kept_tensors}",
                  f"  Checked             : {len(self.checks)}  (GOOD {n[GOOD]}  WARN {n[WARN]}  FAIL {n[FAIL]})",
                  f"  Structure problems  : {len(self.problems)}"]
        if self.checks:
            mean_cos = sum(c.cos for c in self.checks) / len(self.checks)
            mean_mae = sum(c.mae for c in self.checks) / len(self.checks)
            worst_mae = max(c.mae for c in self.checks)
            worst_max = max(c.maxae for c in self.checks)
            lines += ["-" * 72, f"  {'metric':<16}{'value':>12}   {'band':<6}  hard limit", "  " + "-" * 52,
                      f"  {'cosine sim':<16}{mean_cos:>12.6f}   {bands.cos(mean_cos):<6}  >= {bands.cos_warn}",
                      f"  {'mean abs err':<16}{mean_mae:>12.6f}   {bands.mae(mean_mae):<6}  <= {bands.mae_warn}",
                      f"  {'worst MAE':<16}{worst_mae:>12.6f}   {bands.mae(worst_mae):<6}  <= {bands.mae_warn}",
                      f"  {'worst MaxAE':<16}{worst_max:>12.6f}   {bands.maxae(worst_max):<6}  <= {bands.maxae_warn}"]
        bad = [c for c in self.checks if c.status != GOOD]
        if bad or self.problems:
            lines += ["-" * 72, "  NOT GOOD"]
            lines += [f"  FAIL  {p}" for p in self.problems[:20]]
            for c in sorted(bad, key=lambda c: -_RANK[c.status])[:20]:
                which = ", ".join(f"{k} {v}" for k, v in c.bands.items() if v != GOOD)
                lines.append(f"  {c.status}  {c.name}: cos {c.cos:.6f}, MAE {c.mae:.6f}, MaxAE {c.maxae:.6f} ({which})")
        recs = recommendations(self)
        if recs:
            lines += ["-" * 72, "  RECOMMENDATIONS"] + [f"  {i + 1}. {r}" for i, r in enumerate(recs)]
        verdict = {GOOD: "All checks GOOD. Ready for inference.",
                   WARN: "Within hard limits but outside the typical range: see the recommendations.",
                   FAIL: "FAIL: do not deploy this checkpoint."}[self.status]
        lines += ["-" * 72, f"  {verdict}", "=" * 72]
        return "\n".join(lines)


def recommendations(report: VerifyReport) -> list[str]:
    out = []
    if report.problems:
        out.append("Structure problems mean a broken or incomplete checkpoint: quantize again "
                   "(fp8norm quantize --overwrite, or --resume after an interruption).")
    if any(c.bands.get("maxae") != GOOD for c in report.checks):
        out.append("Max abs error is high: outliers are clipped. Raise --rms-factor (k), or use --calib max "
                   "or --calib mse.")
    if any(c.bands.get("mae") != GOOD for c in report.checks):
        out.append("Mean abs error is high: scales are too coarse. Lower --rms-factor (k), or use --calib mse "
                   "(with --activation-stats for the channels that matter).")
    if any(c.bands.get("cos") != GOOD for c in report.checks):
        out.append("Cosine similarity is low: try --calib rms (same speed, outlier-robust) or --calib mse; "
                   "keep the affected tensors in bf16 with --exclude if it persists.")
    return out


def _scale_of(name: str, tensors: dict[str, TensorInfo]) -> str | None:
    for suffix in ("_scale_inv", "_scale"):
        if name + suffix in tensors:
            return name + suffix
    return None


def verify(src: str | Path, quant: str | Path, *, samples: int | None = 5, seed: int = 0,
           bands: Bands = Bands(), progress=None) -> VerifyReport:
    """Compare QUANT with SRC: `samples` FP8 tensors per shard (None: all), and the whole structure."""
    src, quant = Path(src), Path(quant)
    report = VerifyReport()
    try:
        q_ckpt = open_checkpoint(quant)
    except (CheckpointError, SafetensorsError) as e:
        report.problems.append(str(e))
        return report
    s_ckpt = open_checkpoint(src)
    cfg = _read_json(quant / "config.json")
    qcfg = (cfg or {}).get("quantization_config") or {}
    block = tuple(qcfg.get("weight_block_size") or nx.DEFAULT_BLOCK_SIZE)
    prov = _read_json(quant / "fp8norm.json")
    if prov and isinstance(prov.get("calibration"), dict):
        from .calibrate import CalibSettings

        c = prov["calibration"]
        report.calibration = CalibSettings(c.get("mode", "max"), **{k: v for k, v in c.items() if k != "mode"}).describe()
    qt, st = q_ckpt.tensors, s_ckpt.tensors
    fp8 = [n for n, i in qt.items() if i.dtype in FP8_DTYPES]
    scales = {s for n in fp8 if (s := _scale_of(n, qt))}
    report.fp8_tensors = len(fp8)
    _check_index(quant, q_ckpt, report)
    for n in fp8:
        s = _scale_of(n, qt)
        if s is None:
            report.problems.append(f"{qt[n].file.name}: tensor {n!r} is FP8 but has no {n}_scale_inv")
        elif qt[s].shape != nx.scale_inv_shape(qt[n].shape, block):
            report.problems.append(f"{qt[s].file.name}: scale {s!r} has shape {list(qt[s].shape)}, expected "
                                   f"{list(nx.scale_inv_shape(qt[n].shape, block))} for {list(qt[n].shape)}")
    for n, info in qt.items():
        base = n.removesuffix("_scale_inv").removesuffix("_scale")
        if base != n and n not in scales and base not in st:
            report.problems.append(f"{info.file.name}: scale {n!r} has no FP8 weight {base!r}")
    missing = [n for n in st if n not in qt]
    if missing:
        report.problems.append(f"{len(missing)} source tensor(s) missing from the output, e.g. {missing[0]!r}")
    extra = [n for n in qt if n not in st and n not in scales]
    if extra:
        report.problems.append(f"{len(extra)} output tensor(s) not in the source, e.g. {extra[0]!r}")
    kept = [n for n in qt if n in st and n not in fp8 and n not in scales]
    report.kept_tensors = len(kept)
    for n in kept:
        if qt[n].dtype != st[n].dtype or qt[n].shape != st[n].shape or not _same_bytes(qt[n], st[n]):
            report.problems.append(f"{qt[n].file.name}: kept tensor {n!r} differs from the source")
    _check_config(qcfg, fp8, qt, report)
    rng = random.Random(seed)
    by_shard: dict[str, list[str]] = {}
    for n in fp8:
        if _scale_of(n, qt) and n in st and qt[n].shape == st[n].shape:
            by_shard.setdefault(qt[n].file.name, []).append(n)
    for shard, names in sorted(by_shard.items()):
        pick = names if samples is None or samples >= len(names) else sorted(rng.sample(names, samples))
        for n in pick:
            s = _scale_of(n, qt)
            report.checks.append(compare(n, shard, read_tensor(qt[n]), read_tensor(qt[s]), read_tensor(st[n]),
                                         block, bands))
    return report


def _read_json(path: Path):
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except json.JSONDecodeError:
        return None


def _same_bytes(a: TensorInfo, b: TensorInfo) -> bool:
    return torch.equal(read_tensor(a).reshape(-1).view(torch.uint8), read_tensor(b).reshape(-1).view(torch.uint8))


def _check_index(quant: Path, ckpt, report: VerifyReport) -> None:
    index_path = quant / INDEX_NAME
    if not index_path.exists():
        if len(ckpt.files) > 1:
            report.problems.append(f"{quant}: {len(ckpt.files)} shards but no {INDEX_NAME}")
        return
    index = json.loads(index_path.read_text())
    total = sum(i.nbytes for i in ckpt.tensors.values())
    if index.get("metadata", {}).get("total_size") != total:
        report.problems.append(f"{index_path}: metadata.total_size is {index.get('metadata', {}).get('total_size')}"
                               f", the tensors hold {total} bytes")


def _check_config(qcfg: dict, fp8: list[str], qt: dict[str, TensorInfo], report: VerifyReport) -> None:
    if fp8 and not qcfg:
        report.problems.append("config.json has no quantization_config but the checkpoint holds FP8 tensors")
        return
    if not fp8:
        return
    if qcfg.get("quant_method") not in ("fp8", "compressed-tensors", "modelopt"):
        report.problems.append(f"config.json quantization_config.quant_method is {qcfg.get('quant_method')!r}")
    if qcfg.get("scale_fmt") == "ue8m0":
        not_pow2 = [s for n in fp8 if (s := _scale_of(n, qt)) and not nx.is_power_of_two(read_tensor(qt[s]))]
        if not_pow2:
            report.problems.append(f"config.json claims scale_fmt ue8m0 but {len(not_pow2)} scale tensor(s) are "
                                   f"not all powers of two, e.g. {not_pow2[0]!r}")
    skipped = set(qcfg.get("modules_to_not_convert") or ())
    for n in fp8:
        module = n.removesuffix(".weight")
        if module in skipped:
            report.problems.append(f"config.json lists {module!r} in modules_to_not_convert, but it is FP8")
