"""dequant_fp8_block: Triton kernel and torch twin against the oracle, 2D and 3D, every scale dtype."""

import math

import pytest
import torch

from tests.oracle import oracle_dequant

SCALE_DTYPES = [torch.float32, torch.bfloat16, torch.float8_e8m0fnu]
OUT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def random_fp8(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    codes[(codes & 0x7F) == 0x7F] = 0x01  # drop NaN codes
    return codes.view(torch.float8_e4m3fn)


@pytest.mark.parametrize("shape", [(1, 1), (127, 129), (256, 384), (3, 200, 130)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_bit_exact_vs_oracle(backend, shape, scale_dtype, out_dtype):
    q = random_fp8(shape)
    s_shape = (*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128))
    if scale_dtype == torch.float8_e8m0fnu:
        scale = torch.exp2(torch.randint(-20, 5, s_shape).float()).to(scale_dtype)
    else:
        scale = (torch.rand(s_shape) * 1e-2 + 1e-5).to(scale_dtype)
    y = backend.dequant(q, scale, out_dtype=out_dtype)
    assert y.dtype == out_dtype and y.shape == q.shape
    assert torch.equal(y.view(torch.uint8) if y.element_size() == 1 else y, oracle_dequant(q, scale, out_dtype=out_dtype))


def test_errors(backend):
    q = random_fp8((130, 130))
    with pytest.raises(ValueError, match="expected"):
        backend.dequant(q, torch.ones(1, 1))
    with pytest.raises(TypeError):
        backend.dequant(q.view(torch.uint8), torch.ones(2, 2))
    with pytest.raises(TypeError):
        backend.dequant(q, torch.ones(2, 2), out_dtype=torch.int8)


def _e4m3_by_formula(c: int) -> float:
    """OCP e4m3fn by hand: sign, 4 exponent bits (bias 7), 3 mantissa bits; S.1111.111 is NaN."""
    sign, e, m = -1.0 if c & 0x80 else 1.0, (c >> 3) & 0xF, c & 7
    if e == 15 and m == 7:
        return math.nan
    return sign * (m / 8 * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))


def test_fast_e4m3_to_float32_is_the_formula_on_every_code():
    from fp8norm.reference import e4m3_to_float32

    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    want = torch.tensor([_e4m3_by_formula(c) for c in range(256)], dtype=torch.float32)
    # a strided 2D view too: every code, in a [16, 16] transposed layout
    for q, shape in ((codes, (256,)), (codes.view(16, 16).t(), (16, 16))):
        out = e4m3_to_float32(q, torch.empty(shape)).reshape(-1)
        ref = want.view(16, 16).t().reshape(-1) if q.dim() == 2 else want
        finite = ~torch.isnan(ref)
        assert torch.equal(torch.isnan(out), ~finite)
        assert torch.equal(out[finite], ref[finite])
        assert torch.equal(torch.signbit(out[finite]), torch.signbit(ref[finite]))  # -0.0 stays -0.0
    assert torch.equal(codes.float().nan_to_num(), want.nan_to_num())  # (and torch's cast agrees)


def test_nan_codes_dequantize_to_nan(backend):
    """0x7F/0xFF are e4m3's NaN: NaN out on every backend (the interpreter's own cast says 480)."""
    codes = torch.tensor([[0x7F, 0xFF, 0x38, 0xB8]], dtype=torch.uint8).view(torch.float8_e4m3fn)
    y = backend.dequant(codes, torch.ones(1, 1), out_dtype=torch.float32)
    assert torch.isnan(y[0, :2]).all() and y[0, 2:].tolist() == [1.0, -1.0]
