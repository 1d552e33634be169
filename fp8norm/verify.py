"""`fp8norm verify`: is an FP8 checkpoint a correct quantization of its source, what does the format
cost on it, and is it well formed.

Two questions per FP8 tensor, answered separately:

1. **Is it correct?** Each element must be the round-to-nearest-even e4m3 value of x / scale, with
   saturation at +-448 (x the source element, scale its tile's stored scale, whatever its dtype:
   fp32, bf16, or a power of two for ue8m0). Tested as: |q - x/scale| <= half an e4m3 step at that
   value (+ 2^-21 relative for the order of the kernel's x * (1/scale)), and q = +-448 where |x/scale|
   >= 448. This holds for every calibration (it only fixes the scale) and for all-zero tiles (the
   amax floor gives them a finite scale and zeros). Any element outside it is a corrupted byte, a
   wrong or swapped scale, or another source: FAIL, the tensor and first element named. An output
   requantized from FP8 (`convert --to fp8-ue8m0`, as its fp8norm.json records) was rounded
   twice: 1.5 steps are allowed there (the first grid's step is under twice the second's, since
   the larger power-of-two scale can move a value down one binade: < 1 step + 1/2 step).

2. **What does the format cost here?** Scale-free metrics, so no band depends on the weights' scale
   or outliers: relative RMS error ||deq - x|| / ||x|| and SQNR = -20 log10 of it, cosine, the
   largest error relative to its tile's amax, and the fractions of elements clipped (|x/scale| > 448,
   saturated by the calibration) and flushed to zero.

   The floor, i.e. what e4m3 costs when nothing is clipped: with 3 mantissa bits a normal value
   m * 2^e (1 <= m < 2) is rounded to a grid of step 2^(e-3); the error is close to uniform in
   +-2^(e-4), mean square 2^(2e-6) / 12, and relative to x^2 = m^2 2^(2e) that is 2^-6 / (12 m^2).
   Averaged over the mantissas of real weights (energy-weighted) the relative RMS error is 0.0265
   (measured 0.02647-0.02663 on Gaussian weights of any scale; the bound 1/17 = 0.0588 is reached
   only when every large element sits just above a grid point): SQNR = 31.5 dB, and since
   1 - cos = rel_rms^2 / 2 for an unbiased error, 1 - cos = 3.5e-4. Max calibration (scale =
   tile amax / 448) clips nothing and keeps all but tiny elements normal (the smallest normal is
   2^-6 * scale, amax / 28672), so it sits on that floor whatever the outliers: cosine 0.99965 is
   the format, not a warning sign. Clipping calibrations (rms, percentile, mse) can only add
   clipping error on top, except where they lift elements out of the subnormal range.

   Default bands: SQNR GOOD >= 29.5 dB (the floor - 2 dB: rel RMS 1.26x the floor, outside the
   spread of correctly rounded weights), WARN >= 20 dB (rel RMS 0.1: beyond what rounding normal
   numbers can cost, 1/17, so something is clipped or flushed), FAIL below. Clipped elements: none
   expected under max calibration (any is WARN); up to 1% GOOD under a clipping calibration or an
   unknown one, more is WARN (the SQNR band judges what clipping costs). The seed tool's absolute
   bands (cosine, mean and max absolute error) may be added with `--cos-bands` etc.

Other schemes (`quantize --scheme` / `convert --to`, compressed-tensors layouts, fused 3D experts
written per expert and projection; the scheme is read off config.json's quantization_config):

- **fp8-channel**: the same e4m3 check with the row's scale (`weight_scale` [N, 1]) as the tile, and
  e4m3's floor and bands (a row is a tile of one row; measured 0.0246-0.0265 on Gaussian, Laplace,
  Student-t and uniform weights).
- **mxfp8 / mxfp4**: every element RNE(x / X) in e4m3 / e2m1 with saturation at 448 / 6, X = 2^(code
  - 127) the block's E8M0 scale (exact: x / X only moves the exponent), and every scale code the one
  the rule fp8norm.json records (`mx_rule`: rceil, ocp or ct, fp8norm.kernels.numerics.mx) gives for its
  block's amax, or without that record (another tool's output) the one any of them gives; a changed
  scale is a FAIL naming the block even where its elements are zeros.
  The cost of MX depends on the distribution inside each block of 32 (power-of-two scales, saturation
  under the OCP rule, e2m1's two binades), so the bands are bounds of correct rounding rather than
  spreads around one floor. In units of X the block amax is in [2^emax, 2^(emax+1)) (OCP; [1.75, 3.5)
  x 2^emax for the compressed-tensors rule).
  * E2M1 (1 mantissa bit): a normal value m 2^e is rounded to a step of 2^(e-1), so mean square
    relative error 2^-2 / (12 m^2), 16x e4m3's 2^-6 / (12 m^2): 4x the relative RMS, 4 x 0.0265 =
    0.106, plus the block's elements below 1 (units of X) on the subnormal step 0.5, and saturation
    of amax in [6, 8): measured 0.114 on Gaussian weights (18.9 dB; 0.126 Laplace, 0.141
    Student-t(3); 0.16 on the examples' heavy-tailed weights with outlier columns). GOOD >= 13.9 dB,
    i.e. rel RMS <= 1/5, the most rounding a normal e2m1 number can cost (half a step 2^-2 over
    1 + 2^-2); WARN down to 6.5 dB: every element errs at most 1/4 of itself (|v| >= 1: half steps
    0.25/1, 0.5/2, 1/4, clipping 2/8) or 0.25 (|v| < 1), and each block holds its amax >= 3.5, so
    err^2 <= 1/16 (E + 31) <= 1/16 E (1 + 31/12.25): rel RMS <= 0.47 = 6.56 dB for any correct
    output. Below that is a FAIL.
  * MXFP8 (e4m3 elements): e4m3's floor plus the OCP saturation of amax in [448, 512): measured
    0.0292 (30.7 dB) on Gaussian weights (0.0267 with compressed-tensors' rule, 0.0335 Student-t(3)).
    GOOD >= 24.6 dB (rel RMS 1/17, the most rounding a normal e4m3 number costs); FAIL below 18.0 dB
    (0.125 = 64/512, the most saturation costs; subnormals, |v| < 2^-6 beside an amax >= 256, add
    under 2^-20 relative): no correct output gets there.
  Clipping (saturation) is the format's own under the OCP rule: not judged apart, the SQNR band
  judges what it costs.
- **nvfp4** (`convert --to nvfp4`, ModelOpt layout: `weight` packed E2M1, `weight_scale` e4m3 per 16,
  `weight_scale_2` fp32; `--to nvfp4-ct`, compressed-tensors `nvfp4-pack-quantized`: `weight_packed`,
  `weight_scale`, `weight_global_scale` = 1 / scale_2): every element RNE(x / (weight_scale *
  scale_2)) in e2m1, saturating at 6 (fp8norm.kernels.numerics.nvfp4); a quotient exactly halfway
  between two values must be the even one (the kernel finishes its division to the IEEE quotient the twin
  computes, so a tie is a tie in both). The group scale maps its amax to
  6 up to the e4m3 rounding of the scale (amax / scale in [5.65, 6.4]: clipping is the format's own).
  Floor: measured 0.0951 (20.4 dB) on Gaussian weights of any scale (0.0927 Laplace, 0.0904
  Student-t(3)). GOOD >= 13.9 dB (rel RMS 1/5, as e2m1 above); WARN down to 10.3 dB: every element errs
  at most 1/4 of itself (|v| >= 1, clipping to 6 of at most 6.4 included) or 0.25 (|v| < 1), and each
  group of 16 holds its amax >= 5.65, so err^2 <= 1/16 (E + 15) <= 1/16 E (1 + 15/31.9): rel RMS <=
  0.303 = 10.4 dB for any correct output (groups whose scale sits on e4m3's floor 2^-9, under 2^-9 / 448
  of the tensor's amax, aside).

Structure: every FP8 weight has a scale of the right shape and every scale a weight, kept tensors
are byte-identical to the source, the index covers every tensor exactly once, config.json's
quantization_config agrees with the tensors.
"""

from __future__ import annotations

import json
import math
import random
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .kernels.numerics import fp8_block as nx
from .kernels.numerics import mx
from . import formats
from .formats import Format
from .formats.compressed_tensors import module_of, output_modules, split_source
from .calib_settings import CalibSettings
from .classify import Decision as D
from .checkpoint import INDEX_NAME, CheckpointError, open_checkpoint
from .checks import FAIL, GOOD, WARN, Bands, ElementFormat, TensorCheck, compare, element_format, worst
from .st_io import FP8_DTYPES, SafetensorsError, TensorInfo, map_tensor, read_header, read_tensor


# Exit code of `verify`, `quantize` and `convert` when the verification FAILs (the output stays on
# disk, marked in fp8norm.json); 1 is any other error, 2 a usage error.
EXIT_VERIFY_FAILED = 3

CLIPPING_CALIBRATIONS = ("rms", "percentile", "mse")
_RANK = {GOOD: 0, WARN: 1, FAIL: 2}  # the report lists the worst first

# By Format.verify_key: NVFP4 in either layout, block FP8 in every layout, each scheme (module docstring)
NVFP4 = formats.get("nvfp4").verify_key
BLOCK_KEY = formats.get("fp8").verify_key  # block FP8 and what verify judges as it
SCHEME_FORMATS = {f.verify_key: element_format(f) for f in formats.FORMATS.values()}
# How the report names a format's quantized weights ("FP8 weight tensors": block FP8, the default)
WEIGHT_LABELS = {f.verify_key: f.weight_label for f in formats.FORMATS.values()}
# Schemes whose scales let the largest elements saturate: clipping is the format's, judged by SQNR alone
SATURATING_SCHEMES = tuple(dict.fromkeys(f.verify_key for f in formats.FORMATS.values() if f.saturates))


_LAYER = re.compile(r"\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.experts\.\d+\.")


def tensor_kind(name: str) -> tuple[str, str | None]:
    """('mlp.experts.up_proj', '3') for 'model.layers.3.mlp.experts.7.up_proj.weight'; a layer of a
    stack other than the main model's is named with its prefix ('self_attn.q_proj', 'mtp.0' for
    'mtp.layers.0.self_attn.q_proj.weight'); None outside layers."""
    m = _LAYER.search(name)
    if not m:
        return name.removesuffix(".weight"), None
    kind = _EXPERT.sub(".experts.", "." + name[m.end():])[1:].removesuffix(".weight")
    prefix = name[:m.start()]
    main = prefix.split(".")[-1] in ("model", "language_model", "decoder")
    return kind, m.group(1) if main else f"{prefix}.{m.group(1)}"


def layer_order(layer: str) -> tuple:
    """Main layers by number, then other stacks' (mtp.0, ...), then tensors outside layers ("-")."""
    if layer.isdigit():
        return (0, int(layer), "")
    return (2, 0, "") if layer == "-" else (1, 0, layer)


def per_layer_sqnr(checks: list[TensorCheck]) -> dict[str, dict[str, float]]:
    """{kind: {layer: SQNR dB}} over the checked tensors (layers as tensor_kind names them, "-"
    outside layers); tensors of one kind and layer (experts) pooled as the mean of their squared
    relative RMS errors."""
    pooled: dict[str, dict[str, list[float]]] = {}
    for c in checks:
        kind, layer = tensor_kind(c.name)
        pooled.setdefault(kind, {}).setdefault(layer or "-", []).append(c.rel_rms ** 2)
    out = {}
    for kind, layers in sorted(pooled.items()):
        out[kind] = {}
        for layer in sorted(layers, key=layer_order):
            ms = sum(layers[layer]) / len(layers[layer])
            out[kind][layer] = round(-10 * math.log10(ms), 3) if ms > 0 else math.inf
    return out


@dataclass
class VerifyReport:
    checks: list[TensorCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # structural, each a FAIL
    fp8_tensors: int = 0
    kept_tensors: int = 0
    calibration: str | None = None       # as described, e.g. "rms(k=3)"; None: unknown producer
    calibration_mode: str | None = None  # "max", "rms", ...
    bands: Bands = field(default_factory=Bands)
    scheme: str = "fp8-block"

    @property
    def element_format(self) -> ElementFormat:
        return SCHEME_FORMATS[self.scheme]

    @property
    def floor_name(self) -> str:
        """Whose floor the report shows: the element format's ("e4m3" for block FP8), with the scheme where
        one element format serves several (MXFP4 and NVFP4 are both e2m1, with different floors)."""
        return self.element_format.name if self.scheme == BLOCK_KEY else f"{self.scheme} ({self.element_format.name})"

    @property
    def weight_label(self) -> str:
        """The format's name for its quantized weights: "FP8" (block FP8), "MXFP4", "NVFP4", ..."""
        return WEIGHT_LABELS[self.scheme]

    @property
    def status(self) -> str:
        return worst(FAIL if self.problems else GOOD, *(c.status for c in self.checks))

    def to_dict(self) -> dict:
        return {"status": self.status, "fp8_tensors": self.fp8_tensors, "kept_tensors": self.kept_tensors,
                "checked": len(self.checks), "problems": self.problems, "calibration": self.calibration,
                "scheme": self.scheme, "format": self.weight_label,
                "floor": {"element_format": self.element_format.name, "rel_rms": self.element_format.floor_rel_rms,
                                                 "sqnr_db": round(-20 * math.log10(self.element_format.floor_rel_rms), 2)},
                "bands": asdict(self.bands), "sqnr_db_by_kind_and_layer": per_layer_sqnr(self.checks),
                "tensors": [asdict(c) for c in self.checks]}

    def format(self) -> str:
        b = self.bands
        n = {s: sum(c.status == s for c in self.checks) for s in (GOOD, WARN, FAIL)}
        lines = ["=" * 72, "  QUANTIZATION VERIFICATION SUMMARY"]
        if self.calibration:
            lines.append(f"  Calibration         : {self.calibration}")
        lines += ["-" * 72,
                  f"  {self.weight_label + ' weight tensors':<20}: {self.fp8_tensors}",
                  f"  Kept tensors        : {self.kept_tensors}",
                  f"  Checked             : {len(self.checks)}  (GOOD {n[GOOD]}  WARN {n[WARN]}  FAIL {n[FAIL]})",
                  f"  Structure problems  : {len(self.problems)}"]
        if self.checks:
            fmt = self.element_format
            floor_rel, floor_db = fmt.floor_rel_rms, -20 * math.log10(fmt.floor_rel_rms)
            right = sum(not c.wrong_elements and not c.wrong_scales for c in self.checks)
            scale = "weight_scale * scale_2" if self.scheme == NVFP4 else "scale"
            lines.append(f"  Correctly rounded   : {right} of {len(self.checks)} (every element RNE(x / {scale}) in "
                         f"{fmt.name}{', every scale by the MX rule' if formats.get(self.scheme).takes_mx_rule else ''})")
            pooled = sum(c.rel_rms ** 2 for c in self.checks) / len(self.checks)
            mean_rel = pooled ** 0.5
            mean_sqnr = -10 * math.log10(pooled) if pooled > 0 else math.inf
            worst_sqnr = min(c.sqnr_db for c in self.checks)
            worst_clip = max(c.clipped_frac for c in self.checks)
            clip_band = GOOD if worst_clip <= b.clipped_good else WARN
            sqnr_band = GOOD if worst_sqnr >= b.sqnr_good else WARN if worst_sqnr >= b.sqnr_warn else FAIL
            clip_note = "none expected (max)" if b.clipped_good == 0 else f"GOOD <= {100 * b.clipped_good:g}%"
            lines += ["-" * 72,
                      f"  {'cost of the format':<22}{'worst':>9}{'mean':>10}   {'band':<6} {self.floor_name} floor / bands",
                      f"  {'SQNR (dB)':<22}{worst_sqnr:>9.2f}{mean_sqnr:>10.2f}   {sqnr_band:<6} "
                      f"{floor_db:.1f}; GOOD >= {b.sqnr_good:g}, FAIL < {b.sqnr_warn:g}",
                      f"  {'relative RMS error':<22}{max(c.rel_rms for c in self.checks):>9.4f}{mean_rel:>10.4f}"
                      f"   {'':<6} {floor_rel}",
                      f"  {'1 - cosine':<22}{max(1 - c.cos for c in self.checks):>9.1e}"
                      f"{sum(1 - c.cos for c in self.checks) / len(self.checks):>10.1e}   {'':<6} "
                      f"{floor_rel ** 2 / 2:.1e}",
                      f"  {'max err / tile amax':<22}{max(c.max_err_rel_amax for c in self.checks):>9.4f}",
                      f"  {'clipped':<22}{100 * worst_clip:>8.2f}%"
                      f"{100 * sum(c.clipped_frac for c in self.checks) / len(self.checks):>9.2f}%   "
                      f"{clip_band:<6} {clip_note}",
                      f"  {'flushed to zero':<22}{100 * max(c.flushed_frac for c in self.checks):>8.2f}%"
                      f"{100 * sum(c.flushed_frac for c in self.checks) / len(self.checks):>9.2f}%"]
            for key, label, fmt in (("cos", "cosine", ".6f"), ("mae", "mean abs err", ".6f"),
                                    ("maxae", "max abs err", ".6f")):
                if getattr(b, key) is not None:
                    vals = [getattr(c, key) for c in self.checks]
                    w = min(vals) if key == "cos" else max(vals)
                    band = worst(*(c.bands[key] for c in self.checks))
                    lines.append(f"  {label + ' (absolute)':<22}{w:>9{fmt}}{'':>10}   {band:<6} GOOD/WARN {getattr(b, key)}")
        bad = [c for c in self.checks if c.status != GOOD]
        if bad or self.problems:
            lines += ["-" * 72, "  NOT GOOD"]
            lines += [f"  FAIL  {p}" for p in self.problems[:20]]
            for c in sorted(bad, key=lambda c: -_RANK[c.status])[:20]:
                which = ", ".join(f"{k} {v}" for k, v in c.bands.items() if v != GOOD)
                if c.wrong_scales:
                    what = f"{c.wrong_scales} scale(s) not the {self.weight_label} rule's, e.g. {c.first_wrong_scale}"
                elif c.wrong_elements:
                    what = f"{c.wrong_elements} of {c.elements} element(s) not RNE(x / scale), e.g. {c.first_wrong}"
                else:
                    what = (f"SQNR {c.sqnr_db:.1f} dB, rel RMS {c.rel_rms:.4f}, clipped {100 * c.clipped_frac:.2f}%, "
                            f"flushed {100 * c.flushed_frac:.2f}%")
                lines.append(f"  {c.status}  {c.name}: {what} ({which})")
        recs = recommendations(self)
        if recs:
            lines += ["-" * 72, "  RECOMMENDATIONS"] + [f"  {i + 1}. {r}" for i, r in enumerate(recs)]
        # the verdict claims no more than was checked: how many of the quantized tensors, and none is no verdict
        checked, label = len(self.checks), self.weight_label
        if self.status == FAIL:
            verdict = "FAIL: do not deploy this checkpoint."
        elif not checked:
            verdict = (f"Nothing was checked: 0 of {self.fp8_tensors} {label} tensors sampled." if self.fp8_tensors else
                       f"Nothing was checked: no {label} weight tensor to compare with the source.")
        else:
            what = (f"All {checked} {label} tensors checked" if checked >= self.fp8_tensors else
                    f"Checked {checked} of {self.fp8_tensors} {label} tensors (sampled)")
            verdict = what + {GOOD: ": all GOOD.",
                              WARN: ": correct, but the format costs more than usual here: see above."}[self.status]
        lines += ["-" * 72, f"  {verdict}", "=" * 72]
        return "\n".join(lines)


# Compute time of each calibration relative to max on the CPU twin, 1 thread (benchmarks/
# test_bench_calibrate.py, README "Calibration"); on a GPU max is the fused kernel, the others eager torch.
CALIB_COST_VS_MAX = {"rms": "~6x", "percentile": "~23x", "mse": "~150x"}


def recommendations(report: VerifyReport) -> list[str]:
    """Only what would help, with what it costs."""
    out = []
    wrong = [c for c in report.checks if c.wrong_elements or c.wrong_scales]
    if wrong:
        out.append(f"{len(wrong)} tensor(s) are not a correct rounding of the source ({wrong[0].name}: "
                   f"{wrong[0].first_wrong_scale or wrong[0].first_wrong}): bytes or scales changed after quantization, tensors swapped, or "
                   "SRC is not the model this was made from. Quantize again (fp8norm quantize --overwrite); "
                   "if a fresh output fails too, report a bug.")
    if report.problems:
        out.append("Structure problems mean a broken or incomplete checkpoint: quantize again "
                   "(fp8norm quantize --overwrite, or --resume after an interruption).")
    right = [c for c in report.checks if not c.wrong_elements and not c.wrong_scales]
    clipped = [c for c in right if c.bands.get("clipped") != GOOD]
    costly = [c for c in right if c.bands.get("sqnr") != GOOD]
    mode, fmt = report.calibration_mode, report.element_format
    if clipped and mode == "max":
        out.append(f"{len(clipped)} tensor(s) have scales below their tile amax / 448 although fp8norm.json says "
                   "max calibration: the scales were changed after quantization. Quantize again.")
    elif clipped or (costly and any(c.clipped_frac > 0 for c in costly)):
        worst_c = max(clipped or costly, key=lambda c: c.clipped_frac)
        how = f"--calib {mode}" if mode in CLIPPING_CALIBRATIONS else "this checkpoint's calibration"
        extra = {"rms": " (a larger --rms-factor clips less)",
                 "percentile": " (a higher --percentile clips less)"}.get(mode, "")
        out.append(f"{how} clips up to {100 * worst_c.clipped_frac:.2f}% of the elements ({worst_c.name}, SQNR "
                   f"{worst_c.sqnr_db:.1f} dB vs {fmt.name}'s {fmt.floor_sqnr_db:.1f} dB floor). --calib max clips nothing "
                   f"and is the cheapest{extra}: FP8's step is relative, so clipping buys precision only for "
                   "elements below e4m3's smallest normal (2^-6 of the scale).")
    flushed = [c for c in costly if c.clipped_frac == 0 and c.flushed_frac > 1e-3]
    if flushed:
        out.append(f"{len(flushed)} tensor(s) lose elements to zero (up to "
                   f"{100 * max(c.flushed_frac for c in flushed):.2f}%: tiles whose amax is over 28672x their small "
                   f"values). --calib mse (compute {CALIB_COST_VS_MAX['mse']} that of max) clips such outliers "
                   "where that lowers the error; or keep these tensors in bf16 with --exclude REGEX (2x their "
                   "memory).")
    other = [c for c in costly if c.clipped_frac == 0 and c.flushed_frac <= 1e-3]
    if other:
        out.append(f"{len(other)} tensor(s) round worse than {fmt.name}'s typical floor with nothing clipped or "
                   f"flushed (e.g. {other[0].name}, {other[0].sqnr_db:.1f} dB): their values sit far from {fmt.name}'s "
                   "grid; no calibration changes the rounding of normal numbers. If the model's quality "
                   "suffers, keep them in bf16 with --exclude REGEX (2x their memory).")
    return out


def _scale_of(name: str, tensors: dict[str, TensorInfo]) -> str | None:
    for suffix in ("_scale_inv", "_scale"):
        if name + suffix in tensors:
            return name + suffix
    return None


def read_provenance(quant: Path) -> dict:
    """fp8norm.json of an output (empty when another tool made it)."""
    doc = _read_json(Path(quant) / "fp8norm.json")
    return doc if isinstance(doc, dict) else {}


def mark_failed(provenance_text: str, report: VerifyReport) -> str:
    """fp8norm.json's text for an output whose own verification FAILed: a `verification` entry (status
    FAIL, the exit code, the failing tensors and problems). Outputs that pass keep their text as it is."""
    doc = json.loads(provenance_text)
    doc["verification"] = {"status": FAIL, "exit_code": EXIT_VERIFY_FAILED,
                           "failed_tensors": [c.name for c in report.checks if c.status == FAIL],
                           "problems": report.problems[:20]}
    return json.dumps(doc, indent=2) + "\n"


def verify(src: str | Path, quant: str | Path, *, samples: int | None = 5, seed: int = 0,
           bands: Bands | None = None, band_overrides: dict | None = None) -> VerifyReport:
    """Compare QUANT with SRC: `samples` FP8 tensors per shard (None: all), and the whole structure.

    `bands` None: the defaults for the calibration fp8norm.json records (see the module docstring),
    with `band_overrides` (Bands fields) applied."""
    src, quant = Path(src), Path(quant)
    prov = read_provenance(quant)
    calib = prov.get("calibration") if isinstance(prov.get("calibration"), dict) else None
    mode = calib.get("mode", "max") if calib else None
    report = VerifyReport(bands=bands or Bands.for_calibration(mode, **(band_overrides or {})), calibration_mode=mode)
    if calib:
        report.calibration = CalibSettings(mode, **{k: v for k, v in calib.items() if k != "mode"}).describe()
    # requantized from an FP8 source: the values were rounded twice
    made = formats.FORMATS.get(prov.get("converted_to"))
    steps = 1.5 if made is not None and made.requantizes_fp8 else 0.5
    try:
        q_ckpt = open_checkpoint(quant)
    except (CheckpointError, SafetensorsError) as e:
        report.problems.append(str(e))
        return report
    s_ckpt = open_checkpoint(src)
    cfg = _read_json(quant / "config.json")
    qcfg = (cfg or {}).get("quantization_config") or {}
    try:
        fmt = formats.detect(cfg or {}, q_ckpt.tensors)[0]
    except ValueError:  # a layout no format reads: checked as block FP8, its problems listed
        fmt = None
    if fmt is not None and fmt.per_module:
        report.scheme = fmt.verify_key
        report.bands = bands or Bands.for_format(fmt, mode, **(band_overrides or {}))
        mx_rule = prov.get("mx_rule")
        if mx_rule is not None and mx_rule not in mx.SCALE_RULES:
            report.problems.append(f"{quant / 'fp8norm.json'}: mx_rule {mx_rule!r} is none of "
                                   f"{', '.join(mx.SCALE_RULES)}")
            mx_rule = None
        verify_members(fmt, quant, q_ckpt, s_ckpt, qcfg or fmt.config_beside(quant), report, samples, seed, mx_rule)
        return report
    block = tuple(qcfg.get("weight_block_size") or nx.DEFAULT_BLOCK_SIZE)
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
        s = _scale_of(n, qt)
        if s and n in st and qt[n].shape == st[n].shape and qt[s].shape == nx.scale_inv_shape(qt[n].shape, block):
            by_shard.setdefault(qt[n].file.name, []).append(n)
    for shard, names in sorted(by_shard.items()):
        pick = names if samples is None or samples >= len(names) else sorted(rng.sample(names, samples))
        for n in pick:
            s = _scale_of(n, qt)
            report.checks.append(compare(n, shard, read_tensor(qt[n]), read_tensor(qt[s]), read_tensor(st[n]),
                                         block, report.bands, rounding_steps=steps))
    return report


def source_matrix(name: str, s_ckpt, src_block, read=read_tensor) -> torch.Tensor:
    """A source weight as quantization read it: as stored, or an FP8 block weight dequantized to fp32
    (`read`: how a tensor is read, read_tensor or map_tensor)."""
    info = s_ckpt.tensors[name]
    x = read(info)
    if info.dtype in FP8_DTYPES and (s := _scale_of(name, s_ckpt.tensors)):
        from .reference import dequant_fp8_block

        x = dequant_fp8_block(x, read(s_ckpt.tensors[s]), block_size=src_block, out_dtype=torch.float32)
    return x


# Decisions whose outputs are freshly rounded, so checked after writing: quantize's FP8 (block or a
# scheme), convert's requantization to ue8m0 scales and its conversion to a scheme or NVFP4.
_VERIFIED = (D.FP8, D.UE8M0, D.SCHEME, D.NVFP4)


def _format_of(plan):
    """The format the plan writes (convert --to, or quantize --scheme)."""
    return formats.get(plan.convert_to or plan.scheme)


def _new_report(plan) -> VerifyReport:
    mode, fmt = plan.settings.calib.mode, _format_of(plan)
    return VerifyReport(calibration=plan.settings.calib.describe(), calibration_mode=mode,
                        bands=Bands.for_format(fmt, mode), scheme=fmt.verify_key)


def check_written(plan, out_dir: Path, by_shard: dict[str, list], samples: int, *, workers: int = 1) -> VerifyReport:
    """The check after writing (quantize, convert): `samples` freshly rounded tensors of each finished
    shard of `plan` in `out_dir` (`by_shard`: the plan's tensors per shard) re-read from disk and
    compared with the values they were made from; the sampled tensors side by side on `workers`
    threads (an output of a single shard too), the checks in shard and name order."""
    report = _new_report(plan)
    fmt = _format_of(plan)
    picked = []  # (shard, tensor), what is checked
    for shard in plan.shards:
        rounded = [t for t in by_shard[shard] if t.decision in _VERIFIED]
        rng = random.Random(shard)  # (the shard's file name: the same sample on every run)
        picked += [(shard, t) for t in sorted(rng.sample(rounded, min(samples, len(rounded))), key=lambda t: t.name)]
        # counted as `fp8norm verify` counts them: a scheme's per module (a fused 3D tensor is one per expert)
        report.fp8_tensors += sum(len(t.outputs) // fmt.tensors_per_member if fmt.per_module else 1 for t in rounded)
        report.kept_tensors += len(by_shard[shard]) - len(rounded)
    headers = {shard: read_header(out_dir / shard)[0] for shard in {shard for shard, _ in picked}}
    with ThreadPoolExecutor(workers) as pool:
        for checks in pool.map(lambda p: _check_written_tensor(plan, fmt, p[0], headers[p[0]], p[1], report.bands),
                               picked):
            report.checks += checks
    return report


def _check_written_tensor(plan, fmt: Format, shard: str, infos: dict, t, bands: Bands) -> list[TensorCheck]:
    """Re-read freshly rounded tensor `t` of a finished shard (`infos`: its header) from disk and compare
    it with the values it was made from (the source tensor, or an FP8 source dequantized with its
    scales). Both are mapped, not copied into fresh memory: this run's source and its own locked output."""
    # block FP8 outputs keep the source's blocks when converted, else the plan's
    block = plan.source_format.block_size if plan.source_format is not None else plan.settings.block_size
    src = source_matrix(t.name, plan.checkpoint, block, read=map_tensor)
    if fmt.per_module:  # (elements, scale[, global scale]) per module, fused experts per expert
        k = fmt.tensors_per_member
        groups = [t.outputs[i:i + k] for i in range(0, len(t.outputs), k)]
        return [fmt.compare_member(fmt.output_key(g[0].name), shard, [map_tensor(infos[o.name]) for o in g],
                                   x, bands, plan.mx_rule)
                for g, x in zip(groups, fmt.source_parts(t.name, src))]
    q = map_tensor(infos[t.outputs[0].name])
    scale_inv = map_tensor(infos[t.outputs[1].name])
    return [compare(t.name, shard, q, scale_inv, src, block, bands)]


def verify_members(fmt: Format, quant: Path, q_ckpt, s_ckpt, qcfg: dict, report: VerifyReport,
                   samples: int | None, seed: int, mx_rule: str | None) -> None:
    """verify() for an output `fmt` judges per module (Format.per_module: a compressed-tensors scheme,
    NVFP4 in either layout): the structure (each member's tensors and source present and well formed,
    every source tensor quantized whole or kept byte for byte, nothing extra), then `samples` members
    per shard compared with their sources by fmt.compare_member."""
    from .source_checks import PlanError

    qt, st = q_ckpt.tensors, s_ckpt.tensors
    scheme = fmt.verify_key
    members = fmt.written_members(qt, st)
    report.fp8_tensors = len(members)
    _check_index(quant, q_ckpt, report)
    owned = {n for mem in members.values() for n in mem.tensors}
    owned |= {m + suffix for m in members for suffix in (".weight", ".weight_packed", ".weight_scale")}
    valid = []
    for key, mem in members.items():
        try:
            if mem.elements not in qt:
                raise PlanError(f"{qt[mem.scale].file.name}: scale {mem.scale!r} has no {scheme} weight "
                                f"{mem.elements!r}")
            fmt.check_member(q_ckpt, mem)
            if mem.source is None:
                raise PlanError(f"{qt[mem.elements].file.name}: quantized module {key!r} has no source weight")
        except PlanError as e:
            report.problems.append(str(e))
            continue
        valid.append(key)
    for n, info in qt.items():
        # (FP8 weights an NVFP4 output keeps from an FP8 source carry their `_scale_inv`: kept tensors)
        if info.dtype in FP8_DTYPES and n not in owned and not (fmt.keeps_scaled_fp8 and _scale_of(n, qt)):
            report.problems.append(f"{info.file.name}: tensor {n!r} is FP8 but has no {module_of(n)}.weight_scale")
    quantized_src = {mem.source[0] for mem in members.values() if mem.source}
    # an FP8 source's scales are read with its weights, not kept
    consumed = quantized_src | {s for n in quantized_src if (s := _scale_of(n, st))}
    for n in sorted(quantized_src):
        absent = [m for m in output_modules(n, tuple(st[n].shape)) if m not in members]
        if absent and n not in members:
            report.problems.append(f"source tensor {n!r} is quantized but {len(absent)} of its modules are not in "
                                   f"the output, e.g. {absent[0]!r}")
    missing = [n for n in st if n not in qt and n not in consumed]
    if missing:
        report.problems.append(f"{len(missing)} source tensor(s) missing from the output, e.g. {missing[0]!r}")
    extra = [n for n in qt if n not in st and n not in owned]
    if extra:
        report.problems.append(f"{len(extra)} output tensor(s) not in the source, e.g. {extra[0]!r}")
    kept = [n for n in qt if n in st and n not in owned]
    report.kept_tensors = len(kept)
    for n in kept:
        if qt[n].dtype != st[n].dtype or qt[n].shape != st[n].shape or not _same_bytes(qt[n], st[n]):
            report.problems.append(f"{qt[n].file.name}: kept tensor {n!r} differs from the source")
    _check_config(qcfg, [mem.elements for mem in members.values()], qt, report)
    src_cfg = _read_json(s_ckpt.root / "config.json") or {}
    src_block = tuple((src_cfg.get("quantization_config") or {}).get("weight_block_size") or nx.DEFAULT_BLOCK_SIZE)
    rng = random.Random(seed)
    by_shard: dict[str, list[str]] = {}
    for key in valid:
        by_shard.setdefault(qt[members[key].elements].file.name, []).append(key)
    for shard, names in sorted(by_shard.items()):
        pick = names if samples is None or samples >= len(names) else sorted(rng.sample(names, samples))
        cache: dict[str, list[torch.Tensor]] = {}
        for key in pick:
            mem = members[key]
            n, i = mem.source
            if n not in cache:
                cache.clear()  # one source tensor at a time (picks sorted: a fused tensor's experts together)
                x = source_matrix(n, s_ckpt, src_block)
                cache[n] = [x] if i is None else split_source(n, x)
            x = cache[n][i or 0]
            if tuple(x.shape) != fmt.unpacked_shape(qt[mem.elements].dtype, tuple(qt[mem.elements].shape)):
                report.problems.append(f"{qt[mem.elements].file.name}: {mem.elements!r} has shape "
                                       f"{list(qt[mem.elements].shape)}, its source {list(x.shape)}")
                continue
            stored = [read_tensor(qt[n]) for n in mem.tensors]
            report.checks.append(fmt.compare_member(key, shard, stored, x, report.bands, mx_rule))


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


QUANT_METHODS = ("fp8", "compressed-tensors", "modelopt")  # the quantization_config.quant_method values read


def _check_config(qcfg: dict, fp8: list[str], qt: dict[str, TensorInfo], report: VerifyReport) -> None:
    if fp8 and not qcfg:
        report.problems.append("config.json has no quantization_config but the checkpoint holds FP8 tensors")
        return
    if not fp8:
        return
    if qcfg.get("quant_method") not in QUANT_METHODS:
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
