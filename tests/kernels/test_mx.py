"""quant_mx / dequant_mx (MXFP8, MXFP4): Triton kernel and torch twin, bit for bit against an oracle
written from the OCP Microscaling Formats (MX) Specification v1.0, section 6.3 ("X =
2^(floor(log2(max|V|)) - emax_elem)", elements = V / X rounded to nearest even and saturated to the
element's max normal), and for `rule="ct"` against compressed-tensors' own scale generation and
quantization (calculate_qparams / quantize, what llm-compressor writes), and for `rule="rceil"` (the
default) against "X = 2^ceil(log2(max|V| / elem_max))" and Triton's `downcast_to_mxfp` ROUND_UP
formula. No rule's scale lets a finite input dequantize to inf."""

import math

import pytest
import torch

from tests.conftest import Backend
from tests.readers import reader

E4M3 = torch.float8_e4m3fn
E2M1_GRID = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])
EMAX = {"mxfp8": 8, "mxfp4": 2}  # spec table 1: emax of E4M3 and E2M1
ELEM_MAX = {"mxfp8": 448.0, "mxfp4": 6.0}
BF16_MAX = torch.finfo(torch.bfloat16).max


# --------------------------------------------------------------------------- oracle (from the spec)


def oracle_exponent(amax, fmt, rule):
    """Shared exponent per block: floor(log2(amax)) - emax (ocp) or ceil(log2(amax / elem_max)) (rceil),
    clamped to E8M0's range [-127, 127] and to the largest X with elem_max * X <= bfloat16's max."""
    a = amax.double()
    e = torch.floor(torch.log2(a)) - EMAX[fmt] if rule == "ocp" else torch.ceil(torch.log2(a / ELEM_MAX[fmt]))
    top = math.floor(math.log2(BF16_MAX / ELEM_MAX[fmt]))
    return e.clamp(-127, min(127, top))


def oracle_e2m1(v):
    """Nearest of the 8 E2M1 magnitudes, ties to the even code, saturating at 6; sign = v < 0."""
    dist = (v.abs().unsqueeze(-1) - E2M1_GRID[:8]).abs()
    best = dist.min(-1, keepdim=True).values
    ties = dist == best
    even = ties & (torch.arange(8) % 2 == 0)
    code = torch.where(even.any(-1), even.float().argmax(-1), ties.float().argmax(-1))
    return code.to(torch.uint8) | ((v < 0).to(torch.uint8) << 3)


def oracle_quant2d(x, fmt, rule):
    """fp32 [M, N] -> (elements as stored, uint8 scale codes)."""
    m, n = x.shape
    g = x.double().view(m, n // 32, 32)
    e = oracle_exponent(g.abs().amax(-1), fmt, rule)
    v = (g / torch.pow(2.0, e).unsqueeze(-1)).float().view(m, n)
    if fmt == "mxfp8":
        elems = v.clamp(-448, 448).to(E4M3)
    else:
        c = oracle_e2m1(v)
        elems = c[:, 0::2] | (c[:, 1::2] << 4)
    return elems, (e + 127).to(torch.uint8)


def oracle_quant(x, fmt, rule="rceil"):
    if x.dim() == 2:
        return oracle_quant2d(x.float(), fmt, rule)
    outs = [oracle_quant2d(x2.float(), fmt, rule) for x2 in x]
    return tuple(torch.stack(t) for t in zip(*outs))


def oracle_dequant(elems, codes, fmt, out_dtype=torch.float32):
    if fmt == "mxfp8":
        v = elems.float()
    else:
        v = E2M1_GRID[torch.stack([elems & 0xF, elems >> 4], -1).flatten(-2).long()]
    scale = torch.pow(2.0, codes.double() - 127).repeat_interleave(32, -1)
    return (v.double() * scale).to(out_dtype)


# --------------------------------------------------------------------------- helpers


def quant(backend, x, **kw):
    if isinstance(kw.get("src_scale_inv"), torch.Tensor):
        kw["src_scale_inv"] = kw["src_scale_inv"].to(backend.device)
    e, s = backend.impl.quant_mx(x.to(backend.device), **kw)
    return e.cpu(), s.cpu()


def b(t):
    return t.view(torch.uint8) if t.dtype == E4M3 else t


def assert_same(a, c):
    assert a.dtype == c.dtype and a.shape == c.shape
    assert torch.equal(b(a), b(c))


def ranged(shape, seed=0):
    """Gaussian values with per-row magnitudes spanning many binades (and some exact powers of two)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.pow(2.0, torch.randint(-20, 20, (*shape[:-1], 1), generator=g))
    x.view(-1)[::97] = 2.0 ** 3
    return x.to(torch.bfloat16)


@pytest.mark.parametrize("rule", ["ocp", "rceil"])
@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4"])
@pytest.mark.parametrize("shape", [(70, 96), (3, 33, 64)])
def test_matches_spec_oracle_2d_and_3d(backend, fmt, shape, rule):
    x = ranged(shape)
    e, s = quant(backend, x, fmt=fmt, rule=rule)
    oe, os_ = oracle_quant(x, fmt, rule)
    assert_same(e, oe)
    assert_same(s, os_)
    assert s.shape == (*shape[:-1], shape[-1] // 32)
    d = backend.impl.dequant_mx(e.to(backend.device), s.to(backend.device), fmt=fmt, out_dtype=torch.float32)
    assert torch.equal(d.cpu(), oracle_dequant(e, s, fmt))


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4"])
def test_every_element_value_and_saturation(backend, fmt):
    """Each row is one block with amax 2^k * (max mantissa) pinned, then every grid point and every
    midpoint between neighbours (ties to even) and values past the max (saturate)."""
    grid = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6]) if fmt == "mxfp4" else \
        torch.arange(127, dtype=torch.uint8).view(E4M3).float()
    mids = (grid[1:] + grid[:-1]) / 2
    past = 2.0 ** (EMAX[fmt] + 1) * 0.99  # beyond the max normal, still under X = 1: saturates
    vals = torch.cat([grid, mids, -grid, -mids, torch.tensor([past, -past])])
    n = -(-vals.numel() // 32) * 32
    x = torch.zeros(n).index_copy(0, torch.arange(vals.numel()), vals).view(1, n)
    # one block per row holding the values, plus a pinned amax so X = 1 under the spec's rule
    x = x.view(n // 32, 32).clone()
    x[:, 0] = 2.0 ** EMAX[fmt]
    e, s = quant(backend, x.float(), fmt=fmt, rule="ocp")
    oe, os_ = oracle_quant(x.float(), fmt, "ocp")
    assert_same(e, oe)
    assert_same(s, os_)
    assert (s == 127).all()


def test_zero_tiny_and_huge_blocks(backend):
    x = torch.zeros(4, 64)
    x[1, :32] = 1e-40  # fp32 subnormal: code clamps to 0
    x[2, 32:] = 3e38
    x[3, 5] = -2.0 ** -126
    for fmt in ("mxfp8", "mxfp4"):
        for rule in ("ocp", "rceil"):
            e, s = quant(backend, x, fmt=fmt, rule=rule)
            oe, os_ = oracle_quant(x, fmt, rule)
            assert_same(e, oe)
            assert_same(s, os_)
    assert s[0].tolist() == [0, 0]


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4"])
def test_nonfinite_block_is_an_error_naming_it(backend, fmt):
    x = torch.ones(4, 64)
    x[2, 40] = float("nan")
    with pytest.raises(ValueError, match=r"first at scale index \(2, 1\)"):
        quant(backend, x, fmt=fmt)
    with pytest.raises(ValueError, match="multiple of 32"):
        quant(backend, torch.ones(4, 48), fmt=fmt)


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4"])
def test_fp8_source_is_dequantized_in_the_same_pass(backend, fmt):
    g = torch.Generator().manual_seed(1)
    q = (torch.randn(2, 160, 192, generator=g) * 50).clamp(-448, 448).to(E4M3)
    sf = torch.rand(2, 2, 2, generator=g) + 0.01
    e, s = quant(backend, q, fmt=fmt, src_scale_inv=sf)
    full = q.float() * sf.repeat_interleave(128, 1).repeat_interleave(128, 2)[:, :160, :192]
    oe, os_ = oracle_quant(full, fmt)
    assert_same(e, oe)
    assert_same(s, os_)


def test_dequant_out_dtypes_match_twin():
    x = ranged((2, 40, 128), seed=3)
    tw, tr = Backend("torch"), Backend("triton")
    for fmt in ("mxfp8", "mxfp4"):
        e, s = quant(tw, x, fmt=fmt)
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            a = tw.impl.dequant_mx(e, s, fmt=fmt, out_dtype=dt)
            c = tr.impl.dequant_mx(e.to(tr.device), s.to(tr.device), fmt=fmt, out_dtype=dt).cpu()
            assert torch.equal(a, c) or (dt == torch.float16 and torch.equal(a.isinf(), c.isinf()))


# --------------------------------------------------------------------------- compressed-tensors' rule


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4"])
def test_ct_rule_matches_compressed_tensors_quantizer(backend, fmt):
    """rule="ct" gives compressed-tensors' own MX scales and elements, bit for bit (its observer takes
    the per-group min/max; calculate_qparams -> generate_mx_scales; quantize)."""
    reader("compressed_tensors")
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    args = preset_name_to_scheme("MXFP8A16" if fmt == "mxfp8" else "MXFP4A16", ["Linear"]).weights
    x = ranged((48, 128), seed=5)
    g = x.view(48, 4, 32)
    scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), args)
    e, s = quant(backend, x, fmt=fmt, rule="ct")
    assert torch.equal(torch.pow(2.0, s.double() - 127).to(scale.dtype), scale)
    theirs = quantize(x, scale, zp, args, dtype=E4M3 if fmt == "mxfp8" else None)
    if fmt == "mxfp8":
        assert_same(e, theirs)
    else:
        mine = E2M1_GRID[torch.stack([e & 0xF, e >> 4], -1).flatten(-2).long()]
        assert torch.equal(mine.to(theirs.dtype), theirs)


def test_ct_and_ocp_rules_differ_only_where_the_spec_saturates(backend):
    """The spec keeps X when amax's mantissa is >= 1.75 (max elements saturate); CT doubles X there."""
    x = torch.ones(3, 32)
    x[0, 0], x[1, 0], x[2, 0] = 1.5, 1.75, 1.9
    _, ocp = quant(backend, x, fmt="mxfp8", rule="ocp")
    _, ct = quant(backend, x, fmt="mxfp8", rule="ct")
    assert (ct.int() - ocp.int()).flatten().tolist() == [0, 1, 1]
    assert math.isclose(2.0 ** (ocp[0, 0].item() - 127), 2.0 ** -8)


# --------------------------------------------------------------------------- rceil, and no inf


@pytest.mark.parametrize("fmt,rceil_up,ct_up", [("mxfp8", [0, 0, 0, 1], [0, 0, 1, 1]),
                                                 ("mxfp4", [0, 1, 1, 1], [0, 0, 1, 1])])
def test_rules_round_up_where_the_amax_mantissa_says(backend, fmt, rceil_up, ct_up):
    """Block amax mantissas 1.5, 1.6, 1.75, 1.9: rceil doubles the spec's X exactly above the element
    max's mantissa (1.75 for E4M3 448, 1.5 for E2M1 6), ct at 1.75 and above whatever the format."""
    x = torch.ones(4, 32)
    x[:, 0] = torch.tensor([1.5, 1.6, 1.75, 1.9])
    _, ocp = quant(backend, x, fmt=fmt, rule="ocp")
    _, rceil = quant(backend, x, fmt=fmt, rule="rceil")
    _, ct = quant(backend, x, fmt=fmt, rule="ct")
    assert (ocp.int() == 127 - EMAX[fmt]).all()
    assert (rceil.int() - ocp.int()).flatten().tolist() == rceil_up
    assert (ct.int() - ocp.int()).flatten().tolist() == ct_up
    _, default = quant(backend, x, fmt=fmt)
    assert torch.equal(default, rceil)


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4"])
def test_rceil_is_tritons_round_up_and_never_clips(backend, fmt):
    """Triton's downcast_to_mxfp (DequantScaleRoundingMode.ROUND_UP) takes the exponent field of
    bits(amax / elem_max) + 0x7FFFFF: the same codes on normal blocks; every element then within the
    element format's max, so nothing saturates."""
    x = ranged((64, 256), seed=9)
    x.view(-1)[::61] *= 1.75  # more amax mantissas at and around the element max's
    e, s = quant(backend, x, fmt=fmt, rule="rceil")
    amax = x.float().view(64, 8, 32).abs().amax(-1)
    triton_bits = (amax / ELEM_MAX[fmt]).view(torch.int32) + 0x7FFFFF
    assert torch.equal(s.int(), (triton_bits >> 23) & 0xFF)
    scaled = x.double().view(64, 8, 32) / torch.pow(2.0, s.double() - 127).unsqueeze(-1)
    assert scaled.abs().max() <= ELEM_MAX[fmt]


@pytest.mark.parametrize("rule", ["rceil", "ocp", "ct"])
@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4"])
def test_bfloat16_max_dequantizes_finite(backend, fmt, rule):
    """A block holding bfloat16's max (3.3895e38): ct and rceil would round its scale to 2^120 (MXFP8),
    where the max element rounds to 256 and 256 * 2^120 = 2^128 is inf; the code is capped at
    254 - emax (2^119: the max saturates to 448 * 2^119 = 2.98e38 in MXFP8, 6 * 2^125 = 3.19e38 in MXFP4)."""
    x = torch.ones(2, 32, dtype=torch.bfloat16)
    x[0, 0], x[1, 3] = BF16_MAX, -BF16_MAX
    e, s = quant(backend, x, fmt=fmt, rule=rule)
    assert (s.int() == 254 - EMAX[fmt]).all()
    for dt in (torch.bfloat16, torch.float32):
        d = backend.impl.dequant_mx(e.to(backend.device), s.to(backend.device), fmt=fmt, out_dtype=dt).cpu()
        assert torch.isfinite(d).all(), dt
        assert d[0, 0].item() == ELEM_MAX[fmt] * 2.0 ** (127 - EMAX[fmt]) == -d[1, 3].item()
