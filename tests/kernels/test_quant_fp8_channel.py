"""quant_fp8_channel / dequant_fp8_channel: Triton kernel and torch twin, bit for bit against an oracle
written from compressed-tensors' FP8 channel scheme (FP8_DYNAMIC weights: `strategy: channel`, one
scale per output row = row amax / 448; value = q * scale) with fp8norm's block conventions (x * (1/sf),
saturating round-to-nearest-even), no amax floor but the smallest normal scale 2^-126, and no scale so
large that 448 * scale passes bfloat16's max."""

import pytest
import torch

from tests.conftest import Backend
from tests.oracle import ceil_bf16, ceil_pow2
from tests.readers import reader

E4M3 = torch.float8_e4m3fn


def oracle_quant(x, scale_fmt="float", scale_dtype=torch.float32):
    xf = x.float()
    sf = (xf.abs().amax(-1, keepdim=True) / 448.0).clamp(min=2.0 ** -126)
    if scale_fmt == "ue8m0":
        sf = ceil_pow2(sf)
    elif scale_dtype == torch.bfloat16:
        sf = ceil_bf16(sf)
    q = (xf * (1.0 / sf)).clamp(-448, 448).to(E4M3)
    return q, sf


def quant(backend, x, **kw):
    if isinstance(kw.get("src_scale_inv"), torch.Tensor):
        kw["src_scale_inv"] = kw["src_scale_inv"].to(backend.device)
    q, s = backend.impl.quant_fp8_channel(x.to(backend.device), **kw)
    return q.cpu(), s.cpu()


def assert_same(q, s, oq, os_):
    assert q.dtype == E4M3 and s.shape == os_.shape
    assert torch.equal(q.view(torch.uint8), oq.view(torch.uint8))
    assert torch.equal(s.float(), os_)


def ranged(shape, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.pow(2.0, torch.randint(-12, 12, (*shape[:-1], 1), generator=g))
    return x.to(dtype)


@pytest.mark.parametrize("shape", [(70, 300), (1, 5), (3, 33, 129)])
@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
def test_matches_oracle_2d_and_3d(backend, shape, scale_fmt):
    x = ranged(shape)
    x.view(-1)[:7] = 0  # a zero row prefix; row 0 of (1, 5) is all zero: scale 2^-126
    q, s = quant(backend, x, scale_fmt=scale_fmt)
    assert_same(q, s, *oracle_quant(x, scale_fmt))
    d = backend.impl.dequant_fp8_channel(q.to(backend.device), s.to(backend.device), out_dtype=torch.float32)
    assert torch.equal(d.cpu(), q.float() * s)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_input_dtypes(backend, dtype):
    x = ranged((40, 130), seed=2, dtype=dtype)
    assert_same(*quant(backend, x), *oracle_quant(x))


def test_bfloat16_scales_are_rounded_up(backend):
    x = ranged((2, 40, 300), seed=7)
    q, s = quant(backend, x, scale_dtype=torch.bfloat16)
    assert s.dtype == torch.bfloat16
    assert_same(q, s, *oracle_quant(x, scale_dtype=torch.bfloat16))


def test_fp8_block_source_requantized_in_one_pass(backend):
    g = torch.Generator().manual_seed(1)
    q0 = (torch.randn(2, 200, 300, generator=g) * 50).clamp(-448, 448).to(E4M3)
    sf0 = torch.rand(2, 2, 3, generator=g) + 0.01
    q, s = quant(backend, q0, src_scale_inv=sf0)
    full = q0.float() * sf0.repeat_interleave(128, 1).repeat_interleave(128, 2)[:, :200, :300]
    assert_same(q, s, *oracle_quant(full))


def test_nonfinite_row_is_an_error_naming_it(backend):
    x = torch.ones(2, 40, 64)
    x[1, 17, 3] = float("inf")
    with pytest.raises(ValueError, match=r"first at row \(1, 17\)"):
        quant(backend, x)


def test_dequant_dtypes_match_twin():
    x = ranged((2, 50, 160), seed=4)
    tw, tr = Backend("torch"), Backend("triton")
    q, s = quant(tw, x)
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        a = tw.impl.dequant_fp8_channel(q, s, out_dtype=dt)
        c = tr.impl.dequant_fp8_channel(q.to(tr.device), s.to(tr.device), out_dtype=dt).cpu()
        assert torch.equal(a, c)


def test_compressed_tensors_channel_dequantization_gives_our_values():
    """compressed-tensors' own dequantize for `strategy: channel` (FP8_DYNAMIC weights) reads our q and
    weight_scale [M, 1] and gives float(q) * scale."""
    reader("compressed_tensors")
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    args = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"]).weights
    x = ranged((64, 96), seed=6)
    q, s = quant(Backend("torch"), x)
    theirs = dequantize(q, s, torch.zeros_like(s), args, dtype=torch.float32)
    assert torch.equal(theirs, q.float() * s)


def test_small_rows_get_their_own_scale_and_zero_rows_zeros(backend):
    """Rows far below the old 1e-4 amax floor keep amax / 448 (their values survive); an all-zero row
    gets 2^-126, fp32's smallest normal, and zeros; a bf16 subnormal row 2^-126 too."""
    x = torch.zeros(4, 64, dtype=torch.bfloat16)
    x[0] = torch.linspace(-1e-6, 1e-6, 64)
    x[1] = torch.linspace(-1e-20, 3e-20, 64)
    x[3, :3] = torch.tensor([9.2e-41, -2.0e-39, 1.1e-38])  # bf16 subnormals
    q, s = quant(backend, x)
    assert s[:, 0].tolist()[:2] == [(x[0].float().abs().max() / 448).item(), (x[1].float().abs().max() / 448).item()]
    assert s[2, 0].item() == s[3, 0].item() == 2.0 ** -126
    assert (q[2].float() == 0).all()
    d = q.float() * s
    assert ((d[:2] - x[:2].float()).abs() <= x[:2].float().abs() / 16 + 2.0 ** -9 * s[:2]).all()
    assert d[3, 2].item() == pytest.approx(1.1e-38, rel=1 / 16)
    with pytest.raises(ValueError, match="amax_floor must be >= 5.266e-36"):
        quant(backend, x, amax_floor=1e-40)


@pytest.mark.parametrize("scale_fmt,scale_dtype,sf", [
    ("float", torch.float32, None),
    ("float", torch.bfloat16, 1.1328125 * 2.0 ** 119),  # the bf16 below bf16_max / 448 = 1.1384 * 2^119
    ("ue8m0", torch.float32, 2.0 ** 119),
])
def test_bfloat16_max_row_dequantizes_finite(backend, scale_fmt, scale_dtype, sf):
    """bf16's max (3.3895e38) in a row: the bf16 scale rounded up (1.140625 * 2^119) gives 448 * sf
    halfway past bf16's max (inf in bf16), the power of two 2^120 an element of 256 * 2^120 = 2^128 (inf
    in fp32). Scales are capped so that 448 * sf <= bf16's max; the max element saturates below it."""
    bmax = torch.finfo(torch.bfloat16).max
    x = torch.ones(3, 40, dtype=torch.bfloat16)
    x[0, 0], x[1, 7], x[2] = bmax, -bmax, bmax / 2
    q, s = quant(backend, x, scale_fmt=scale_fmt, scale_dtype=scale_dtype)
    if sf is not None:
        assert s[0, 0].item() == sf
    for dt in (torch.bfloat16, torch.float32):
        d = backend.impl.dequant_fp8_channel(q.to(backend.device), s.float().to(backend.device), out_dtype=dt).cpu()
        assert torch.isfinite(d).all(), dt
        assert 0.87 * bmax <= d[0, 0].item() <= bmax and d[1, 7].item() == -d[0, 0].item()
