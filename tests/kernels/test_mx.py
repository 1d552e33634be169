"""quant_mx / dequant_mx (MXFP8, MXFP4): Triton kernel and torch twin, bit for bit against an oracle
written from the OCP Microscaling Formats (MX) Specification v1.0, section 6.3 ("X =
2^(floor(log2(max|V|)) - emax_elem)", elements = V / X rounded to nearest even and saturated to the
element's max normal), and for `rule="ct"` against compressed-tensors' own scale generation and
quantization (calculate_qparams / quantize, what llm-compressor writes)."""

import math

import pytest
import torch

from tests.conftest import Backend
from tests.readers import reader

E4M3 = torch.float8_e4m3fn
E2M1_GRID = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])
EMAX = {"mxfp8": 8, "mxfp4": 2}  # spec table 1: emax of E4M3 and E2M1


# --------------------------------------------------------------------------- oracle (from the spec)


def oracle_exponent(amax):
    """Shared exponent per block: floor(log2(amax)) - emax, clamped to E8M0's range [-127, 127]."""
    return torch.floor(torch.log2(amax.double())).clamp(-127 - 8, 127 + 8)


def oracle_e2m1(v):
    """Nearest of the 8 E2M1 magnitudes, ties to the even code, saturating at 6; sign = v < 0."""
    dist = (v.abs().unsqueeze(-1) - E2M1_GRID[:8]).abs()
    best = dist.min(-1, keepdim=True).values
    ties = dist == best
    even = ties & (torch.arange(8) % 2 == 0)
    code = torch.where(even.any(-1), even.float().argmax(-1), ties.float().argmax(-1))
    return code.to(torch.uint8) | ((v < 0).to(torch.uint8) << 3)


def oracle_quant2d(x, fmt):
    """fp32 [M, N] -> (elements as stored, uint8 scale codes)."""
    m, n = x.shape
    g = x.double().view(m, n // 32, 32)
    e = (oracle_exponent(g.abs().amax(-1)) - EMAX[fmt]).clamp(-127, 127)
    v = (g / torch.pow(2.0, e).unsqueeze(-1)).float().view(m, n)
    if fmt == "mxfp8":
        elems = v.clamp(-448, 448).to(E4M3)
    else:
        c = oracle_e2m1(v)
        elems = c[:, 0::2] | (c[:, 1::2] << 4)
    return elems, (e + 127).to(torch.uint8)


def oracle_quant(x, fmt):
    if x.dim() == 2:
        return oracle_quant2d(x.float(), fmt)
    outs = [oracle_quant2d(x2.float(), fmt) for x2 in x]
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


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4"])
@pytest.mark.parametrize("shape", [(70, 96), (3, 33, 64)])
def test_matches_spec_oracle_2d_and_3d(backend, fmt, shape):
    x = ranged(shape)
    e, s = quant(backend, x, fmt=fmt)
    oe, os_ = oracle_quant(x, fmt)
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
    e, s = quant(backend, x.float(), fmt=fmt)
    oe, os_ = oracle_quant(x.float(), fmt)
    assert_same(e, oe)
    assert_same(s, os_)
    assert (s == 127).all()


def test_zero_tiny_and_huge_blocks(backend):
    x = torch.zeros(4, 64)
    x[1, :32] = 1e-40  # fp32 subnormal: code clamps to 0
    x[2, 32:] = 3e38
    x[3, 5] = -2.0 ** -126
    for fmt in ("mxfp8", "mxfp4"):
        e, s = quant(backend, x, fmt=fmt)
        oe, os_ = oracle_quant(x, fmt)
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
    _, ocp = quant(backend, x, fmt="mxfp8")
    _, ct = quant(backend, x, fmt="mxfp8", rule="ct")
    assert (ct.int() - ocp.int()).flatten().tolist() == [0, 1, 1]
    assert math.isclose(2.0 ** (ocp[0, 0].item() - 127), 2.0 ** -8)
