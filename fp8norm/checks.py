"""The numeric judgement of one quantized tensor against its source, for every format: is each element
the round-to-nearest-even value of x / scale in the format's element type (saturating), and what does
the format cost (SQNR, cosine, clipped and flushed fractions), judged by bands. The reasoning behind
the bands is fp8norm.verify's module docstring; a format module (fp8norm.formats) calls the compare
function of its layout with itself, verify and the check after writing call the format.

Below fp8norm.formats: it reads a format's attributes (element, verify_bands, saturates, takes_mx_rule)
and imports nothing of the registry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .kernels.numerics import e2m1
from .kernels.numerics import fp8_block as nx
from .kernels.numerics import mx
from .kernels.numerics import nvfp4 as n4
from .reference import e4m3_to_float32

GOOD, WARN, FAIL = "GOOD", "WARN", "FAIL"
_RANK = {GOOD: 0, WARN: 1, FAIL: 2}

FLOOR_REL_RMS = 0.0265  # e4m3's rounding error on normal numbers (module docstring)
FLOOR_SQNR_DB = -20 * math.log10(FLOOR_REL_RMS)  # 31.5 dB


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


def element_format(f) -> ElementFormat:
    """How verify judges a format's elements: with its own floor and bands (Format.verify_bands), or
    block FP8's."""
    if f.verify_bands is None:
        return E4M3
    return ElementFormat(f.element, *(ELEMENTS.get(f.element) or f.element_range), *f.verify_bands,
                         ties_to_even=f.ties_to_even)


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
    def for_format(cls, f, mode: str | None, **overrides) -> Bands:
        """The bands of format `f` (fp8norm.formats; verify's module docstring, "Other schemes"). MX
        scales are powers of two that the OCP rule lets saturate the block's largest elements: clipping
        is the format's there, judged by the SQNR band alone."""
        fmt = element_format(f)
        base = {"sqnr_good": fmt.sqnr_good, "sqnr_warn": fmt.sqnr_warn}
        if f.saturates:
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


def rne_mismatch(q: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, steps: float = 0.5,
                 fmt: ElementFormat = E4M3) -> torch.Tensor:
    """Elements where fp32 q is not the saturating RNE `fmt` value of x / scale (all per element, fp32;
    x * (1/scale) as the kernel computes it, with 2^-21 relative slack for the order of operations).

    `steps`: allowed error in steps of the format (0.5: one rounding; 1.5: rounded twice, see the module doc)."""
    y = x.float() * torch.reciprocal(scale.float())
    return _mismatch(q.float(), y, y.abs(), steps, fmt)


def _mismatch(q, y, ay, steps: float, fmt: ElementFormat = E4M3) -> torch.Tensor:
    bound = half_step(torch.minimum(ay, q.abs()), fmt).mul_(2 * steps).add_(ay * 2.0 ** -21)
    # both sides False where q or y is NaN (a NaN bound compares False too), and q is never infinite
    # where |y| < max (|q - y| would be), so no separate finiteness pass
    ok = torch.where(ay >= fmt.max, q == torch.sign(y) * fmt.max, (q - y).abs_() <= bound)
    return ~ok


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
    """Running sums over the chunks of one tensor (fp32 sums per chunk, fp64 across chunks)."""

    def __init__(self):
        self.nq = self.nr = self.err_sq = self.abs_sum = 0.0
        self.maxae = self.max_rel = 0.0
        self.n = self.clipped = self.flushed = self.wrong = 0
        self.first_wrong: str | None = None

    def add(self, q, s_tiles, x, block_size, where: str, row0: int, steps: float, fmt: ElementFormat = E4M3,
            col0: int = 0) -> None:
        if self._add_exact(q, s_tiles, x, block_size, fmt):
            return
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
            self.first_wrong = (f"element {where}[{row0 + r}, {col0 + c}]: x {float(xf[r, c]):.6g}, scale {float(s[r, c]):.6g}, "
                                f"stored {float(qf[r, c]):g}, RNE(x/scale) {want:g}")
        self.wrong += n_bad
        self.n += q.numel()
        self.clipped += int((ay > fmt.max * (1 + 2.0 ** -20)).sum())
        self.flushed += int(((qf == 0) & (xf != 0)).sum())
        deq = qf.mul_(s).view(-1)
        flat = xf.reshape(-1)
        self.nq += float(deq.dot(deq))  # dot: a sum of squares in one pass, without a squared copy
        self.nr += float(flat.dot(flat))
        err = deq.sub_(flat).abs_()
        self.err_sq += float(err.dot(err))
        self.abs_sum += float(err.sum())
        err = err.view(qf.shape)
        if err.numel():
            self.maxae = max(self.maxae, float(err.max()))
            # max over elements of err / its tile's amax = max over tiles of (tile max err) / tile amax
            rel = _tile_max(err, block_size) / _tile_max(xf.abs(), block_size).clamp_min(1e-30)  # xf may be the caller's x
            self.max_rel = max(self.max_rel, float(rel.max()))

    def _add_exact(self, q, s_tiles, x, block_size, fmt: ElementFormat) -> bool:
        """The common case at under half add's cost: e4m3 codes on whole tiles, each byte the one the
        saturating RNE cast of x * (1/scale) gives, x and the scales finite. Then no element is wrong
        (an exact value is within any tolerance of add's), and the counts need no per-element
        comparison: no clipping unless a tile's amax * (1/scale) exceeds the largest value, and an
        element is flushed iff x != 0 and q == 0 (x == 0 gives q == 0). Anything else (False, nothing
        added): add's element-by-element judgement."""
        bm, bn = block_size
        rows, cols = q.shape
        if q.dtype != torch.float8_e4m3fn or fmt.name != "e4m3" or fmt.ties_to_even or not q.numel() \
                or rows % bm or cols % bn:
            return False
        tm, tn = rows // bm, cols // bn
        s4 = s_tiles.float().reshape(tm, 1, tn, 1)
        r4 = torch.reciprocal(s4)
        if not bool(torch.isfinite(r4).all()):
            return False
        xf = x.float().contiguous()
        flat = xf.view(-1)
        nr = float(flat.dot(flat))
        if not math.isfinite(nr):  # a NaN or infinite x: add names it
            return False
        x4 = xf.view(tm, bm, tn, bn)
        y = x4 * r4
        want = nx.saturate_e4m3(y).view(rows, cols)
        if not torch.equal(want.view(torch.uint8), q.view(torch.uint8)):
            return False
        x_amax = x4.abs().amax((1, 3))
        if float((x_amax * r4.view(tm, tn)).max()) > fmt.max * (1 + 2.0 ** -20):
            self.clipped += int((y.abs_() > fmt.max * (1 + 2.0 ** -20)).sum())  # (y is done with)
        qf = e4m3_to_float32(want, torch.empty((rows, cols), dtype=torch.float32)).view(tm, bm, tn, bn)
        self.flushed += int(torch.count_nonzero(xf)) - int(torch.count_nonzero(qf))
        deq = qf.mul_(s4)
        self.nq += float(deq.view(-1).dot(deq.view(-1)))
        self.nr += nr
        err = deq.sub_(x4).abs_()
        self.err_sq += float(err.view(-1).dot(err.view(-1)))
        self.abs_sum += float(err.sum())
        err_tiles = err.amax((1, 3))
        self.maxae = max(self.maxae, float(err_tiles.max()))
        self.max_rel = max(self.max_rel, float((err_tiles / x_amax.clamp_min(1e-30)).max()))
        self.n += q.numel()
        return True


def _cuts(n: int, step: int, block: int):
    """(start, stop) ranges of `step` (a multiple of `block`) covering n, the ragged last tile a range
    of its own: every other chunk holds whole tiles (_Sums' exact path)."""
    whole = n - n % block
    for a in range(0, whole, step):
        yield a, min(a + step, whole)
    if whole < n:
        yield whole, n


def compare(name: str, shard: str, q: torch.Tensor, scale_inv: torch.Tensor, src: torch.Tensor,
            block_size, bands: Bands | None = None, chunk_elems: int = 1 << 17,
            rounding_steps: float = 0.5, fmt: ElementFormat = E4M3, decode=None) -> TensorCheck:
    """Check q (with its stored scales) against the source tensor, element by element, and measure
    what the format costs on it; a few tiles at a time, so a large tensor costs little memory.

    `decode(q_rows, scale_rows)` -> (fp32 elements, fp32 scales per tile) reads stored forms other
    than e4m3 with float scales (MX: E8M0 codes, packed E2M1)."""
    bands = bands or Bands()
    bm, bn = block_size
    sums = _Sums()
    mats = [(q, scale_inv, src)] if q.dim() == 2 else list(zip(q, scale_inv, src))
    for e, (q2, s2, x2) in enumerate(mats):
        cols = q2.shape[1]
        rows = max(bm, chunk_elems // max(1, cols) // bm * bm)
        # Tall tiles (bm > 1: block FP8) are cut across the columns too: each chunk's fp32 temporaries
        # stay under glibc's mmap threshold (fp8norm._memory pins it at 1 MiB), so they are reused from
        # the heap; a 128-row stripe of a 14336-wide matrix made each one a fresh 7 MB mmap, and the
        # check spent 3/4 of its time in page faults. (Stored forms that need `decode` have bm == 1.)
        width = max(bn, chunk_elems // rows // bn * bn) if decode is None else None  # None: whole rows
        for r0, r1 in _cuts(q2.shape[0], rows, bm):
            for c0, c1 in _cuts(cols, width, bn) if width else [(0, None)]:  # (None: whole packed rows)
                qc, sc = q2[r0:r1, c0:c1], s2[r0 // bm:nx.ceil_div(r1, bm), c0 // bn:c1 and nx.ceil_div(c1, bn)]
                if decode is not None:
                    qc, sc = decode(qc, sc)
                sums.add(qc, sc, x2[r0:r1, c0:c1], block_size, f"[{e}]" if q.dim() == 3 else "", r0,
                         rounding_steps, fmt, col0=c0)
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


def compare_scheme(f, name: str, shard: str, stored: torch.Tensor, scale: torch.Tensor,
                   src: torch.Tensor, bands: Bands | None = None, mx_rule: str | None = None) -> TensorCheck:
    """One module of a compressed-tensors scheme output (fp8norm.formats: fp8-channel, mxfp8, mxfp4)
    against its source matrix (fp32 or the source dtype): every element RNE(x / scale) in the scheme's
    element format (the row's scale, or the block's E8M0 scale), and for MX every scale code the one
    `mx_rule` (None: any rule of fp8norm.kernels.numerics.mx) gives for its block's amax."""
    fmt = element_format(f)
    bands = bands or Bands.for_format(f, None)
    if not f.takes_mx_rule:  # one scale per row
        return compare(name, shard, stored, scale, src, (1, src.shape[-1]), bands, fmt=fmt)
    mxf = mx.mx_format(f.name)
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


def compare_nvfp4(f, name: str, shard: str, packed: torch.Tensor, weight_scale: torch.Tensor, scale_2: torch.Tensor,
                  src: torch.Tensor, bands: Bands | None = None, exact_scale_2: bool = True) -> TensorCheck:
    """One NVFP4 weight (packed E2M1 `[..., M, N/2]`, e4m3 group scales `[..., M, N/16]`, fp32 scale_2: a
    scalar, or one per expert of a 3D weight) against its source: every element RNE(x / (weight_scale *
    scale_2)) in e2m1, the divisor the fp32 product the quantizer forms (fp8norm.kernels.numerics.nvfp4).
    `exact_scale_2=False`: scale_2 was recovered as 1 / the stored global scale (compressed-tensors), which
    can miss the quantizer's by an ulp, so a quotient on a tie may have gone either way (within 2^-21)."""
    s2 = scale_2.float().reshape(-1, 1, 1) if packed.dim() == 3 else scale_2.float().reshape(())
    table = n4.e2m1_table(packed.device)
    fmt = element_format(f) if exact_scale_2 else replace(element_format(f), ties_to_even=False)
    return compare(name, shard, packed, weight_scale.float() * s2, src, (1, n4.GROUP_SIZE),
                   bands or Bands.for_format(f, None), fmt=fmt,
                   decode=lambda q, s: (table[n4.unpack_codes(q).long()], s))
