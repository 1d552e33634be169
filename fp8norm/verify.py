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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .kernels.numerics import e2m1
from .kernels.numerics import fp8_block as nx
from .kernels.numerics import mx
from .kernels.numerics import nvfp4 as n4
from . import formats
from .formats import Format
from .formats.compressed_tensors import module_of, output_modules, split_source
from .checkpoint import INDEX_NAME, CheckpointError, open_checkpoint
from .reference import e4m3_to_float32
from .st_io import FP8_DTYPES, SafetensorsError, TensorInfo, read_tensor

GOOD, WARN, FAIL = "GOOD", "WARN", "FAIL"
_RANK = {GOOD: 0, WARN: 1, FAIL: 2}

# Exit code of `verify`, `quantize` and `convert` when the verification FAILs (the output stays on
# disk, marked in fp8norm.json); 1 is any other error, 2 a usage error.
EXIT_VERIFY_FAILED = 3

FLOOR_REL_RMS = 0.0265  # e4m3's rounding error on normal numbers (module docstring)
FLOOR_SQNR_DB = -20 * math.log10(FLOOR_REL_RMS)  # 31.5 dB
CLIPPING_CALIBRATIONS = ("rms", "percentile", "mse")



@dataclass(frozen=True)
class ElementFormat:
    """An element format as verify judges it: largest value (saturation), exponent of the smallest
    normal, mantissa bits; the rounding floor (relative RMS error) of the scheme storing it, and the
    relative RMS error beyond which rounding alone cannot explain the cost (WARN -> FAIL)."""
    name: str
    max: float
    min_exp: int
    mant: int
    floor_rel_rms: float
    sqnr_good: float
    sqnr_warn: float
    # e2m1 quotients exactly halfway between two values must be stored as the even one. Only where the
    # quotient is the IEEE fp32 x / scale that both the kernel and the twin compute (NVFP4); elsewhere
    # the kernel's x * (1/scale) may move a tie by an ulp, and either neighbour is accepted there.
    ties_to_even: bool = False

    def rne(self, v: torch.Tensor) -> torch.Tensor:
        """fp32 v -> its saturating round-to-nearest-even value in this format, as fp32."""
        if self.name == "e2m1":
            return n4.e2m1_table(v.device)[n4.e2m1_codes(v.float().reshape(-1)).long()].reshape(v.shape)
        return nx.saturate_e4m3(v.float()).float()

    @property
    def floor_sqnr_db(self) -> float:
        return -20 * math.log10(self.floor_rel_rms)


E4M3 = ElementFormat("e4m3", nx.E4M3_MAX, -6, 3, FLOOR_REL_RMS, round(FLOOR_SQNR_DB - 2.0, 1), 20.0)
# The element formats as verify judges them: (largest value, exponent of the smallest normal, mantissa bits)
ELEMENTS = {"e4m3": (nx.E4M3_MAX, -6, 3), "e2m1": (n4.E2M1_MAX, 0, 1)}


def element_format(f: Format) -> ElementFormat:
    """How verify judges a format's elements: with its own floor and bands (Format.verify_bands), or
    block FP8's."""
    if f.verify_bands is None:
        return E4M3
    return ElementFormat(f.element, *(ELEMENTS.get(f.element) or f.element_range), *f.verify_bands,
                         ties_to_even=f.ties_to_even)


# By Format.verify_key: NVFP4 in either layout, block FP8 in every layout, each scheme (module docstring)
NVFP4 = formats.get("nvfp4").verify_key
BLOCK_KEY = formats.get("fp8").verify_key  # block FP8 and what verify judges as it
SCHEME_FORMATS = {f.verify_key: element_format(f) for f in formats.FORMATS.values()}
# How the report names a format's quantized weights ("FP8 weight tensors": block FP8, the default)
WEIGHT_LABELS = {f.verify_key: f.weight_label for f in formats.FORMATS.values()}
# Schemes whose scales let the largest elements saturate: clipping is the format's, judged by SQNR alone
SATURATING_SCHEMES = tuple(dict.fromkeys(f.verify_key for f in formats.FORMATS.values() if f.saturates))


@dataclass(frozen=True)
class Bands:
    """Verdict bands. SQNR (dB): GOOD at or above sqnr_good, WARN down to sqnr_warn, FAIL below.
    Clipped fraction: above clipped_good is WARN. cos / mae / maxae: optional absolute (GOOD, WARN)
    bounds as the seed tool had them (None: not judged)."""
    sqnr_good: float = round(FLOOR_SQNR_DB - 2.0, 1)
    sqnr_warn: float = 20.0
    clipped_good: float = 0.01
    cos: tuple[float, float] | None = None
    mae: tuple[float, float] | None = None
    maxae: tuple[float, float] | None = None

    @classmethod
    def for_calibration(cls, mode: str | None, **overrides) -> Bands:
        """Max calibration clips nothing by construction; clipping ones (and unknown) may clip 1%."""
        return cls(**{"clipped_good": 0.0 if mode == "max" else 0.01, **overrides})

    @classmethod
    def for_scheme(cls, scheme: str, mode: str | None, **overrides) -> Bands:
        """The bands of `scheme` (module docstring, "Other schemes"). MX scales are powers of two that the OCP rule lets saturate the block's largest
        elements: clipping is the format's there, judged by the SQNR band alone."""
        fmt = SCHEME_FORMATS[scheme]
        base = {"sqnr_good": fmt.sqnr_good, "sqnr_warn": fmt.sqnr_warn}
        if scheme in SATURATING_SCHEMES:
            base["clipped_good"] = 1.0
        return cls.for_calibration(mode, **{**base, **overrides})

    def judge(self, c: TensorCheck) -> dict[str, str]:
        b = {"sqnr": GOOD if c.sqnr_db >= self.sqnr_good else WARN if c.sqnr_db >= self.sqnr_warn else FAIL,
             "clipped": GOOD if c.clipped_frac <= self.clipped_good else WARN}
        if self.cos is not None:
            b["cos"] = GOOD if c.cos >= self.cos[0] else WARN if c.cos >= self.cos[1] else FAIL
        if self.mae is not None:
            b["mae"] = GOOD if c.mae <= self.mae[0] else WARN if c.mae <= self.mae[1] else FAIL
        if self.maxae is not None:
            b["maxae"] = GOOD if c.maxae <= self.maxae[0] else WARN if c.maxae <= self.maxae[1] else FAIL
        return b


def worst(*statuses: str) -> str:
    return max(statuses, key=_RANK.__getitem__, default=GOOD)


@dataclass
class TensorCheck:
    name: str
    shard: str
    cos: float
    rel_rms: float
    sqnr_db: float
    max_err_rel_amax: float  # largest |deq - x| / its tile's amax
    clipped_frac: float      # |x / scale| > 448: saturated by the calibration
    flushed_frac: float      # x != 0 stored as 0
    mae: float
    maxae: float
    elements: int
    wrong_elements: int      # not RNE(x / scale): a corruption
    first_wrong: str | None
    bands: dict
    status: str
    wrong_scales: int = 0    # MX: E8M0 codes no accepted rule gives for the block's amax
    first_wrong_scale: str | None = None


def _expand_tiles(t: torch.Tensor, shape, block_size) -> torch.Tensor:
    """[tm, tn] per-tile values -> [rows, cols] per element."""
    bm, bn = block_size
    rows, cols = shape
    return t.repeat_interleave(bm, 0)[:rows].repeat_interleave(bn, 1)[:, :cols]


def half_step(v: torch.Tensor, fmt: ElementFormat = E4M3) -> torch.Tensor:
    """Half the distance between `fmt` neighbours around v >= 0 (fp32): 2^(floor(log2 v) - mant - 1)
    read off v's exponent bits, at least half the subnormal step (e4m3: 2^-10, e2m1: 2^-2)."""
    pow2 = (v.contiguous().view(torch.int32) & 0x7F800000).view(torch.float32)  # 2^floor(log2 v), 0 for 0
    return (pow2 * 2.0 ** -(fmt.mant + 1)).clamp_min_(2.0 ** (fmt.min_exp - fmt.mant - 1))


def e4m3_half_step(v: torch.Tensor) -> torch.Tensor:
    return half_step(v, E4M3)


def rne_mismatch(q: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, steps: float = 0.5,
                 fmt: ElementFormat = E4M3) -> torch.Tensor:
    """Elements where fp32 q is not the saturating RNE `fmt` value of x / scale (all per element, fp32;
    x * (1/scale) as the kernel computes it, with 2^-21 relative slack for the order of operations).

    `steps`: allowed error in steps of the format (0.5: one rounding; 1.5: rounded twice, see the module doc)."""
    y = x.float() * torch.reciprocal(scale.float())
    return _mismatch(q.float(), y, y.abs(), steps, fmt)


def _mismatch(q, y, ay, steps: float, fmt: ElementFormat = E4M3) -> torch.Tensor:
    bound = half_step(torch.minimum(ay, q.abs()), fmt).mul_(2 * steps).add_(ay * 2.0 ** -21)
    ok = torch.where(ay >= fmt.max, q == torch.sign(y) * fmt.max, (q - y).abs_() <= bound)
    return ~(ok & torch.isfinite(q))


def _odd_ties(q: torch.Tensor, y: torch.Tensor, fmt: ElementFormat) -> torch.Tensor:
    """e2m1 elements whose quotient y lies exactly halfway between two values but are not stored as the
    even one (RNE's choice, fmt.rne)."""
    tie = torch.isin(y.abs(), torch.tensor(e2m1.E2M1_BOUNDS, device=y.device))
    return tie & (q != fmt.rne(y))


def _tile_max(a: torch.Tensor, block_size) -> torch.Tensor:
    """[rows, cols] of values >= 0 -> [tm, tn] tile maxima."""
    bm, bn = block_size
    rows, cols = a.shape
    tm, tn = nx.ceil_div(rows, bm), nx.ceil_div(cols, bn)
    if rows % bm or cols % bn:
        a = torch.nn.functional.pad(a, (0, tn * bn - cols, 0, tm * bm - rows))
    return a.view(tm, bm, tn, bn).amax((1, 3))


class _Sums:
    """Running sums over the chunks of one tensor (fp32 cascade sums per chunk, fp64 across chunks)."""

    def __init__(self):
        self.nq = self.nr = self.err_sq = self.abs_sum = 0.0
        self.maxae = self.max_rel = 0.0
        self.n = self.clipped = self.flushed = self.wrong = 0
        self.first_wrong: str | None = None

    def add(self, q, s_tiles, x, block_size, where: str, row0: int, steps: float, fmt: ElementFormat = E4M3) -> None:
        qf = e4m3_to_float32(q, torch.empty(q.shape, dtype=torch.float32)) if q.dtype == torch.float8_e4m3fn \
            else q.float()
        xf = x.float()
        s = _expand_tiles(s_tiles.float(), qf.shape, block_size)
        y = xf * torch.reciprocal(s)
        ay = y.abs()
        bad = _mismatch(qf, y, ay, steps, fmt)
        if fmt.ties_to_even:
            bad |= _odd_ties(qf, xf / s, fmt)
        n_bad = int(bad.sum())
        if n_bad and self.first_wrong is None:
            r, c = (int(v) for v in bad.nonzero()[0])
            want = float(fmt.rne(xf[r, c] / s[r, c]))
            self.first_wrong = (f"element {where}[{row0 + r}, {c}]: x {float(xf[r, c]):.6g}, scale {float(s[r, c]):.6g}, "
                                f"stored {float(qf[r, c]):g}, RNE(x/scale) {want:g}")
        self.wrong += n_bad
        self.n += q.numel()
        self.clipped += int((ay > fmt.max * (1 + 2.0 ** -20)).sum())
        self.flushed += int(((qf == 0) & (xf != 0)).sum())
        deq = qf.mul_(s)
        self.nq += float(deq.square().sum())
        self.nr += float(xf.square().sum())
        err = deq.sub_(xf).abs_()
        self.err_sq += float(err.square().sum())
        self.abs_sum += float(err.sum())
        if err.numel():
            self.maxae = max(self.maxae, float(err.max()))
            # max over elements of err / its tile's amax = max over tiles of (tile max err) / tile amax
            rel = _tile_max(err, block_size) / _tile_max(xf.abs(), block_size).clamp_min(1e-30)  # xf may be the caller's x
            self.max_rel = max(self.max_rel, float(rel.max()))


def compare(name: str, shard: str, q: torch.Tensor, scale_inv: torch.Tensor, src: torch.Tensor,
            block_size, bands: Bands | None = None, chunk_elems: int = 1 << 18,
            rounding_steps: float = 0.5, fmt: ElementFormat = E4M3, decode=None) -> TensorCheck:
    """Check q (with its stored scales) against the source tensor, element by element, and measure
    what the format costs on it; a few row blocks at a time, so a large tensor costs little memory.

    `decode(q_rows, scale_rows)` -> (fp32 elements, fp32 scales per tile) reads stored forms other
    than e4m3 with float scales (MX: E8M0 codes, packed E2M1)."""
    bands = bands or Bands()
    bm = block_size[0]
    sums = _Sums()
    mats = [(q, scale_inv, src)] if q.dim() == 2 else list(zip(q, scale_inv, src))
    for e, (q2, s2, x2) in enumerate(mats):
        rows = max(bm, chunk_elems // max(1, q2.shape[1]) // bm * bm)
        for r0 in range(0, q2.shape[0], rows):
            qc, sc = q2[r0:r0 + rows], s2[r0 // bm:nx.ceil_div(r0 + rows, bm)]
            if decode is not None:
                qc, sc = decode(qc, sc)
            sums.add(qc, sc, x2[r0:r0 + rows], block_size, f"[{e}]" if q.dim() == 3 else "", r0, rounding_steps, fmt)
    denom = (sums.nq * sums.nr) ** 0.5
    # <deq, x> from ||deq - x||^2 = |deq|^2 + |x|^2 - 2<deq, x>: exact where 1 - cos is tiny
    cos = (sums.nq + sums.nr - sums.err_sq) / (2 * denom) if denom > 0 else float(sums.nq == sums.nr)
    rel_rms = (sums.err_sq / sums.nr) ** 0.5 if sums.nr > 0 else (0.0 if sums.err_sq == 0 else math.inf)
    sqnr = -20 * math.log10(rel_rms) if rel_rms > 0 else math.inf
    n = max(1, sums.n)
    check = TensorCheck(name, shard, cos, rel_rms, sqnr, sums.max_rel, sums.clipped / n, sums.flushed / n,
                        sums.abs_sum / n, sums.maxae, sums.n, sums.wrong, sums.first_wrong, {}, GOOD)
    check.bands = bands.judge(check)
    if sums.wrong:
        check.bands["rounding"] = FAIL
    check.status = worst(*check.bands.values())
    return check


def compare_scheme(scheme: str, name: str, shard: str, stored: torch.Tensor, scale: torch.Tensor,
                   src: torch.Tensor, bands: Bands | None = None, mx_rule: str | None = None) -> TensorCheck:
    """One module of a compressed-tensors scheme output (fp8norm.formats: fp8-channel, mxfp8, mxfp4)
    against its source matrix (fp32 or the source dtype): every element RNE(x / scale) in the scheme's
    element format (the row's scale, or the block's E8M0 scale), and for MX every scale code the one
    `mx_rule` (None: any rule of fp8norm.kernels.numerics.mx) gives for its block's amax."""
    fmt = SCHEME_FORMATS[scheme]
    bands = bands or Bands.for_scheme(scheme, None)
    if not formats.get(scheme).takes_mx_rule:  # one scale per row
        return compare(name, shard, stored, scale, src, (1, src.shape[-1]), bands, fmt=fmt)
    mxf = mx.mx_format(scheme)
    check = compare(name, shard, stored, scale, src, (1, mx.MX_BLOCK), bands, fmt=fmt,
                    decode=lambda q, s: (mx.decode_elements(q, mxf), mx.scale_value(s)))
    amax = src.abs().reshape(*src.shape[:-1], -1, mx.MX_BLOCK).amax(-1).float()  # exact in src's dtype
    codes = scale.to(torch.int32)
    expected = {r: mx.scale_codes(amax, mxf, r) for r in ((mx_rule,) if mx_rule else mx.SCALE_RULES)}
    wrong = torch.stack([codes != e for e in expected.values()]).all(0)
    if bool(wrong.any()):
        i = tuple(int(v) for v in wrong.nonzero()[0])
        check.wrong_scales = int(wrong.sum())
        check.first_wrong_scale = (f"scale block {list(i)}: code {int(codes[i])}, block amax {float(amax[i]):.6g} "
                                   f"gives " + " or ".join(f"{int(e[i])} ({r})" for r, e in expected.items()))
        check.bands["scale"] = check.status = FAIL
    return check


def compare_nvfp4(name: str, shard: str, packed: torch.Tensor, weight_scale: torch.Tensor, scale_2: torch.Tensor,
                  src: torch.Tensor, bands: Bands | None = None, exact_scale_2: bool = True) -> TensorCheck:
    """One NVFP4 weight (packed E2M1 `[..., M, N/2]`, e4m3 group scales `[..., M, N/16]`, fp32 scale_2: a
    scalar, or one per expert of a 3D weight) against its source: every element RNE(x / (weight_scale *
    scale_2)) in e2m1, the divisor the fp32 product the quantizer forms (fp8norm.kernels.numerics.nvfp4).
    `exact_scale_2=False`: scale_2 was recovered as 1 / the stored global scale (compressed-tensors), which
    can miss the quantizer's by an ulp, so a quotient on a tie may have gone either way (within 2^-21)."""
    s2 = scale_2.float().reshape(-1, 1, 1) if packed.dim() == 3 else scale_2.float().reshape(())
    table = n4.e2m1_table(packed.device)
    fmt = SCHEME_FORMATS[NVFP4] if exact_scale_2 else replace(SCHEME_FORMATS[NVFP4], ties_to_even=False)
    return compare(name, shard, packed, weight_scale.float() * s2, src, (1, n4.GROUP_SIZE),
                   bands or Bands.for_scheme(NVFP4, None), fmt=fmt,
                   decode=lambda q, s: (table[n4.unpack_codes(q).long()], s))


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


def _layer_order(layer: str) -> tuple:
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
        for layer in sorted(layers, key=_layer_order):
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
                    what = f"{c.wrong_scales} scale(s) not the MX rule's, e.g. {c.first_wrong_scale}"
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
        from .calibrate import CalibSettings

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
        report.bands = bands or Bands.for_scheme(report.scheme, mode, **(band_overrides or {}))
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


def source_matrix(name: str, s_ckpt, src_block) -> torch.Tensor:
    """A source weight as quantization read it: as stored, or an FP8 block weight dequantized to fp32."""
    info = s_ckpt.tensors[name]
    x = read_tensor(info)
    if info.dtype in FP8_DTYPES and (s := _scale_of(name, s_ckpt.tensors)):
        from .reference import dequant_fp8_block

        x = dequant_fp8_block(x, read_tensor(s_ckpt.tensors[s]), block_size=src_block, out_dtype=torch.float32)
    return x


def verify_members(fmt: Format, quant: Path, q_ckpt, s_ckpt, qcfg: dict, report: VerifyReport,
                   samples: int | None, seed: int, mx_rule: str | None) -> None:
    """verify() for an output `fmt` judges per module (Format.per_module: a compressed-tensors scheme,
    NVFP4 in either layout): the structure (each member's tensors and source present and well formed,
    every source tensor quantized whole or kept byte for byte, nothing extra), then `samples` members
    per shard compared with their sources by fmt.compare_member."""
    from .plan import PlanError

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


PLOT_NEEDS_MATPLOTLIB = "--plot needs matplotlib: pip install 'fp8norm[plot]' (or pip install matplotlib)"
WORST_ANNOTATED = 4  # lowest-SQNR tensors the plot names
BAND_COLOURS = {GOOD: "#dcf0d5", WARN: "#fde5ad", FAIL: "#f8c9c8"}  # light enough to read points over


def require_matplotlib() -> None:
    """Raise the one-line ValueError of `--plot` when matplotlib is missing: call it before the work
    whose result is to be plotted."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        raise ValueError(PLOT_NEEDS_MATPLOTLIB) from None


def _sqnr_view(report: VerifyReport) -> tuple[float, float]:
    """The plot's y range (dB): the finite SQNRs and the format's floor, the nearest band edge on each
    side of them (how far the data sit from the next band), and a strip below the worst tensor for
    the names of the worst ones. Not the whole band range: that squashes 1 dB of spread to nothing."""
    b = report.bands
    floor = report.element_format.floor_sqnr_db
    values = [c.sqnr_db for c in report.checks if math.isfinite(c.sqnr_db)]
    lo, hi = min(values + [floor]), max(values + [floor])
    if any(c.sqnr_db == -math.inf for c in report.checks):  # drawn on the bottom edge: in the FAIL band
        lo = min(lo, b.sqnr_warn)
    edges = (b.sqnr_good, b.sqnr_warn)
    lo = max((e for e in edges if e <= lo), default=lo)
    hi = min((e for e in edges if e >= hi), default=hi)
    span = max(hi - lo, 1.0)
    top, bottom = hi + 0.08 * span, lo - 0.12 * span
    worst_db = min(values, default=floor)
    # the worst tensor at least 30% of the height above the bottom: room for the names
    return min(bottom, (worst_db - 0.3 * top) / 0.7), top


def sqnr_figure(report: VerifyReport):
    """The matplotlib Figure of plot_report (no pyplot: no global backend or figure state).

    One point per checked tensor at its layer (one x position each; tensor kinds side by side within
    it, each kind at the same offset, colour and marker in every layer; experts of a kind stacked at
    one x), no lines between points; GOOD / WARN / FAIL shaded from report.bands, the format's
    floor as a dashed line, the WORST_ANNOTATED lowest-SQNR tensors ringed and named."""
    require_matplotlib()
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fmt, b = report.element_format, report.bands
    floor = fmt.floor_sqnr_db
    placed = [(c, kind, layer or "-") for c in report.checks for kind, layer in [tensor_kind(c.name)]]
    layers = sorted({layer for _, _, layer in placed}, key=_layer_order)
    kinds = sorted({kind for _, kind, _ in placed})
    x_of_layer = {k: i for i, k in enumerate(layers)}
    width = 0.8 / max(1, len(kinds))  # of one layer's x slot per kind
    offset = {k: (i - (len(kinds) - 1) / 2) * width for i, k in enumerate(kinds)}
    lo, hi = _sqnr_view(report)

    fig = Figure(figsize=(min(18.0, max(10.0, 4 + 0.5 * len(layers))), 5.6), dpi=100)
    ax = fig.add_subplot()
    ax.set_xlim(-0.5, max(len(layers), 1) - 0.5)
    ax.set_ylim(lo, hi)
    for status, y0, y1, label in ((GOOD, b.sqnr_good, max(hi, b.sqnr_good), f"GOOD \u2265 {b.sqnr_good:g} dB"),
                                  (WARN, b.sqnr_warn, b.sqnr_good, f"WARN {b.sqnr_warn:g}\u2013{b.sqnr_good:g} dB"),
                                  (FAIL, min(lo, b.sqnr_warn), b.sqnr_warn, f"FAIL < {b.sqnr_warn:g} dB")):
        ax.axhspan(y0, y1, facecolor=BAND_COLOURS[status], edgecolor="none", zorder=0, label=label)
        shown0, shown1 = max(y0, lo), min(y1, hi)
        if shown1 - shown0 > 0.08 * (hi - lo):  # named beside the axis where it shows
            ax.text(1.006, (shown0 + shown1) / 2, status, transform=ax.get_yaxis_transform(), ha="left",
                    va="center", rotation=90, fontsize=9, fontweight="bold", color="#555555")
    ax.axhline(floor, color="#1a7a1a", linestyle="--", linewidth=1.3, zorder=2,
               label=f"{fmt.name} floor {floor:.1f} dB ({report.scheme})")

    def y_of(c: TensorCheck) -> float:  # infinite SQNR (exact, or nothing to compare) drawn on the edge
        return min(max(c.sqnr_db, lo), hi)

    markers = "osD^v<>phP*X"
    colours = [f"C{i}" for i in range(10)]
    for i, kind in enumerate(kinds):
        mine = [(c, layer) for c, k, layer in placed if k == kind]
        ax.scatter([x_of_layer[layer] + offset[kind] for _, layer in mine], [y_of(c) for c, _ in mine],
                   s=34, marker=markers[i % len(markers)], color=colours[i % len(colours)],
                   edgecolors="black", linewidths=0.4, zorder=3, clip_on=False, label=kind)

    worst_first = sorted(placed, key=lambda p: p[0].sqnr_db)[:WORST_ANNOTATED]
    x_of_worst = [x_of_layer[layer] + offset[kind] for _, kind, layer in worst_first]
    y_of_worst = [y_of(c) for c, _, _ in worst_first]
    if worst_first:
        ax.scatter(x_of_worst, y_of_worst, s=190, facecolors="none", edgecolors="black", linewidths=1.6,
                   zorder=4, clip_on=False)
        # the names in the strip below the data that _sqnr_view keeps free, numbered as the rings
        ax.text(0.01, 0.02, "\n".join(f"{rank}. {c.name}  {c.sqnr_db:.2f} dB ({c.status})"
                                      for rank, (c, _, _) in enumerate(worst_first, 1)),
                transform=ax.transAxes, ha="left", va="bottom", fontsize=8, zorder=5, linespacing=1.3,
                bbox={"boxstyle": "round,pad=0.35", "facecolor": "white", "edgecolor": "#888888", "alpha": 0.92})
    for side, i in enumerate(sorted(range(len(worst_first)), key=x_of_worst.__getitem__)):
        # numbers alternately left and right of the rings, so two neighbouring rings keep theirs apart
        right = side % 2 == 1
        ax.annotate(str(i + 1), xy=(x_of_worst[i], y_of_worst[i]), xytext=(7 if right else -7, -4),
                    textcoords="offset points", ha="left" if right else "right", va="top", fontsize=9,
                    fontweight="bold", zorder=5)

    every = max(1, math.ceil(len(layers) / 40))  # at most ~40 layer names on the axis
    ax.set_xticks(range(0, len(layers), every), ["other" if k == "-" else k for k in layers[::every]])
    ax.set_xticks([i + 0.5 for i in range(len(layers) - 1)], minor=True)
    ax.tick_params(axis="x", which="minor", length=0)
    ax.grid(which="minor", axis="x", color="#999999", linewidth=0.8)  # separates the layers
    ax.grid(which="major", axis="y", color="white", linewidth=0.6, alpha=0.8)
    ax.set_xlabel("layer (tensor kinds side by side within each)")
    ax.set_ylabel("SQNR (dB), higher is better")
    title = (f"{report.scheme} ({fmt.name}) quantization error per tensor: {len(report.checks)} tensors, "
             f"status {report.status}")
    if report.calibration:
        title += f", calibration {report.calibration}"
    ax.set_title(title, fontsize=11)
    handles, _ = ax.get_legend_handles_labels()
    if worst_first:
        handles.append(Line2D([], [], linestyle="none", marker="o", markersize=11, markerfacecolor="none",
                              markeredgecolor="black", markeredgewidth=1.6,
                              label=f"{len(worst_first)} lowest SQNR (named)"))
    if not report.checks:
        handles.append(Patch(facecolor="none", edgecolor="none", label="no tensors checked"))
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.035, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig


def plot_report(report: VerifyReport, path: str | Path) -> Path:
    """A PNG of SQNR (dB) per tensor by layer and tensor kind against the format's floor and the bands
    (sqnr_figure). Needs matplotlib (extra `plot`): ValueError naming it, before anything is drawn."""
    fig = sqnr_figure(report)
    path = Path(path)
    fig.savefig(path)
    return path


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
