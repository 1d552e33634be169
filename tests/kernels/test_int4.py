"""quant_int4 / dequant_int4 (W4A16, compressed-tensors `pack-quantized`): Triton kernel and torch twin,
bit for bit against compressed-tensors' own pipeline (calculate_qparams on the group min/max that
llm-compressor's min-max observer takes, quantize, PackedQuantizationCompressor / pack_to_int32), and
against hand-computed codes for zero groups, ties and saturation."""

import pytest
import torch

from fp8norm.kernels.numerics import int4
from tests.conftest import Backend
from tests.readers import reader

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
ZERO_WORD = int.from_bytes(b"\x88" * 4, "little", signed=True)  # eight codes 0 (nibbles 0 + 8)


# --------------------------------------------------------------------------- compressed-tensors' pipeline


def ct():
    """compressed-tensors' modules used as the oracle."""
    reader("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized import helpers
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    from types import SimpleNamespace
    return SimpleNamespace(helpers=helpers, compressor=PackedQuantizationCompressor, Args=QuantizationArgs,
                           Scheme=QuantizationScheme, quantize=quantize, calculate_qparams=calculate_qparams,
                           w4a16=preset_name_to_scheme("W4A16", ["Linear"]))


def ct_scheme(c, group_size):
    if group_size == 128:
        return c.w4a16
    args = c.Args(num_bits=4, type="int", strategy="group", group_size=group_size, symmetric=True)
    return c.Scheme(targets=["Linear"], weights=args)


def ct_compress(x, rule="ct", group_size=128):
    """compressed-tensors' `weight_packed`, `weight_scale`, `weight_shape` for x. The scales: its
    calculate_qparams on the group min/max in x's dtype (the min-max observer). "ct-cpu": its
    compressor as is (torch `_quantize`: x / scale in x's dtype). "ct": what its CUDA kernel computes
    (`_quantize_kernel`: div_rn in fp32, clamp, rint), i.e. the same compressor on fp32 copies."""
    c = ct()
    scheme = ct_scheme(c, group_size)
    g = x.unflatten(-1, (-1, group_size))
    scale, _ = c.calculate_qparams(g.amin(-1), g.amax(-1), scheme.weights)
    w = x if rule == "ct-cpu" else x.float()
    out = c.compressor.compress({"weight": w, "weight_scale": scale.to(w.dtype)}, scheme)
    return out["weight_packed"], scale, out["weight_shape"]


# --------------------------------------------------------------------------- helpers


def quant(backend, x, **kw):
    p, s = backend.impl.quant_int4(x.to(backend.device), **kw)
    return p.cpu(), s.cpu()


def dequant(backend, p, s, **kw):
    return backend.impl.dequant_int4(p.to(backend.device), s.to(backend.device), **kw).cpu()


def ranged(shape, dtype, seed=0):
    """Gaussian values, each row scaled by 2^k (k over many binades that dtype holds)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-12, 6) if dtype == torch.float16 else (-30, 30)
    x = torch.randn(shape, generator=g) * torch.pow(2.0, torch.randint(lo, hi, (*shape[:-1], 1), generator=g))
    return x.to(dtype)


def assert_same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- against compressed-tensors


@pytest.mark.parametrize("rule", ["ct", "ct-cpu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(70, 256), (3, 33, 384)], ids=["2d", "3d-experts"])
def test_matches_compressed_tensors(backend, shape, dtype, rule):
    x = ranged(shape, dtype)
    packed, scale = quant(backend, x, rule=rule)
    theirs_packed, theirs_scale, theirs_shape = ct_compress(x, rule)
    assert_same(scale, theirs_scale)
    assert_same(packed, theirs_packed)
    assert_same(int4.weight_shape(x.shape), theirs_shape)


@pytest.mark.parametrize("group_size", [32, 64])
def test_smaller_groups_match_compressed_tensors(backend, group_size):
    """Groups of 32 / 64, N = 96 / 192: a column tile of 128 only partly filled."""
    x = ranged((40, 3 * group_size), torch.bfloat16, seed=2)
    packed, scale = quant(backend, x, group_size=group_size, rule="ct-cpu")
    theirs_packed, theirs_scale, _ = ct_compress(x, "ct-cpu", group_size)
    assert_same(scale, theirs_scale)
    assert_same(packed, theirs_packed)


def test_rules_differ_where_the_quotient_rounds_onto_a_tie(backend):
    """One bf16 group of amax 3: scale bf16(3 / 7.5) = 0.400390625. x = 1.8046875 gives the fp32
    quotient 4.5073: "ct" rounds it to 5; "ct-cpu" first rounds it to bf16, 4.5, then to even: 4."""
    x = torch.zeros(1, 128)
    x[0, 0], x[0, 1] = 3.0, 1.8046875
    x = x.to(torch.bfloat16)
    assert 4.5 < 1.8046875 / 0.400390625 < 4.5 + 2 ** -6  # within half a bf16 step of the tie
    codes = {}
    for rule in ("ct", "ct-cpu"):
        packed, scale = quant(backend, x, rule=rule)
        assert scale.item() == 0.400390625
        codes[rule] = int4.unpack_int4(packed)[0, :2].tolist()
        assert_same(packed, ct_compress(x, rule)[0])
    assert codes == {"ct": [7, 5], "ct-cpu": [7, 4]}


def test_dequant_matches_compressed_tensors_decompress(backend):
    c = ct()
    for dtype in DTYPES:
        x = ranged((3, 20, 256), dtype, seed=4)
        packed, scale = quant(backend, x)
        theirs = c.compressor.decompress({"weight_packed": packed, "weight_scale": scale,
                                          "weight_shape": int4.weight_shape(x.shape)}, c.w4a16)["weight"]
        assert_same(dequant(backend, packed, scale, out_dtype=dtype), theirs)


def test_pack_and_unpack_match_compressed_tensors():
    c = ct()
    g = torch.Generator().manual_seed(3)
    for shape in [(5, 64), (2, 7, 256)]:
        codes = torch.randint(-8, 8, shape, dtype=torch.int8, generator=g)
        packed = int4.pack_int4(codes)
        assert_same(packed, c.helpers.pack_to_int32(codes, 4))
        assert_same(int4.unpack_int4(packed), codes)
        assert_same(c.helpers.unpack_from_int32(packed, 4, torch.Size(shape)), codes)
    # element 8j + i in bits 4i..4i+3 of word j, as q + 8
    assert int4.pack_int4(torch.tensor([-8, -7, 0, 1, 2, 3, 6, 7])).item() == 0xFEBA9810 - (1 << 32)


def test_ragged_last_dim_is_refused_as_compressed_tensors_does(backend):
    x = torch.ones(4, 200, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"multiple of 128 \(compressed-tensors refuses it too\): x has shape \(4, 200\)"):
        quant(backend, x)
    c = ct()
    with pytest.raises(ValueError, match="divisble by the given group_size 128"):
        c.quantize(x, torch.ones(4, 2, dtype=x.dtype), None, c.w4a16.weights)


def test_ragged_rows_and_empty(backend):
    x = ranged((1, 128), torch.float32, seed=5)
    assert_same(quant(backend, x)[0], ct_compress(x)[0])
    p, s = quant(backend, torch.zeros(0, 256))
    assert p.shape == (0, 32) and s.shape == (0, 2)


# --------------------------------------------------------------------------- hand-computed cases


@pytest.mark.parametrize("dtype,eps", [(torch.bfloat16, 2.0 ** -7), (torch.float16, 2.0 ** -10),
                                       (torch.float32, 2.0 ** -23)], ids=str)
def test_zero_group_gets_eps_scale_and_zero_codes(backend, dtype, eps):
    x = torch.zeros(2, 256, dtype=dtype)
    x[1, 128:] = 1.5  # scale 0.2, codes round(7.5) -> 7 clamped
    packed, scale = quant(backend, x)
    assert scale[:, 0].tolist() == [eps, eps] and scale[0, 1].item() == eps
    assert scale[1, 1].item() == torch.tensor(1.5 / 7.5, dtype=dtype).item()
    assert (packed[:, :16] == ZERO_WORD).all() and (packed[0] == ZERO_WORD).all()
    assert int4.unpack_int4(packed)[1, 128:].tolist() == [7] * 128
    assert (dequant(backend, packed, scale, out_dtype=torch.float32)[:, :128] == 0).all()


def test_ties_round_to_even_after_the_clamp(backend):
    """Scale 1 (amax 7.5): x = k + 0.5 for every k; ties go to the even code, 7.5 clamps to 7 but -7.5
    rounds to -8 (the range is asymmetric)."""
    halves = torch.arange(-8, 8) + 0.5  # -7.5 .. 7.5
    x = torch.zeros(1, 128)
    x[0, :16] = halves
    x[0, 16:32] = -halves
    expected = [-8, -6, -6, -4, -4, -2, -2, 0, 0, 2, 2, 4, 4, 6, 6, 7]
    for dtype in DTYPES:
        packed, scale = quant(backend, x.to(dtype))
        assert scale.item() == 1.0
        codes = int4.unpack_int4(packed)[0]
        assert codes[:16].tolist() == expected
        assert codes[16:32].tolist() == [7, 6, 6, 4, 4, 2, 2, 0, 0, -2, -2, -4, -4, -6, -6, -8]


def test_saturation_where_the_scale_rounds_down(backend):
    """fp16 subnormal scale: amax 11 * 2^-24 -> scale D(11/7.5 * 2^-24) = 2^-24, so 11 * 2^-24 would be
    code 11: clamped to 7 (and -11 to -8). Compressed-tensors gives the same."""
    t = 2.0 ** -24
    x = torch.zeros(1, 128)
    x[0, :4] = torch.tensor([11 * t, -11 * t, 3 * t, -8 * t])
    x = x.to(torch.float16)
    packed, scale = quant(backend, x)
    assert scale.item() == t
    assert int4.unpack_int4(packed)[0, :5].tolist() == [7, -8, 3, -8, 0]
    assert_same(packed, ct_compress(x)[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_error_is_half_a_step(backend, dtype):
    x = ranged((2, 48, 256), dtype, seed=6)
    packed, scale = quant(backend, x)
    back = dequant(backend, packed, scale, out_dtype=torch.float32).double()
    s = scale.double().repeat_interleave(128, -1)
    err = (back - x.double()).abs()
    # q * s is exact in fp32 for bf16/fp16 scales; an fp32 one rounds it (|q| <= 8: 8 u_prod steps)
    u_prod = 2.0 ** -24 if dtype == torch.float32 else 0.0
    inner = x.double().abs() <= 7 * s  # codes -7..7 reach these without clamping
    assert (err[inner] <= s[inner] * (0.5 + 8 * u_prod)).all()
    # the group max sits at 7.5 steps, give or take the scale's rounding (u = half of D's eps): code 7
    # (or -8), at most 0.5 + 7.5u steps off
    u = torch.finfo(dtype).eps / 2
    assert (err <= s * (0.5 + 7.5 * u * (1 + u) + 8 * u_prod)).all()
    assert (err > s * (0.5 + 7.5 * u / 4)).any()  # the bound is nearly reached


def test_nonfinite_group_is_an_error_naming_it(backend):
    for bad in (float("nan"), float("inf")):
        x = torch.ones(4, 256)
        x[2, 140] = bad
        with pytest.raises(ValueError, match=r"in 1 group\(s\) of 128, first at scale index \(2, 1\)"):
            quant(backend, x)


def test_argument_errors(backend):
    x = torch.ones(4, 256)
    with pytest.raises(ValueError, match=r"group_size must be one of \(32, 64, 128\)"):
        quant(backend, x, group_size=100)
    with pytest.raises(ValueError, match="rule must be one of"):
        quant(backend, x, rule="gptq")
    with pytest.raises(TypeError, match="x must be bfloat16, float16 or float32"):
        quant(backend, x.to(torch.int8))
    p, s = quant(backend, x)
    with pytest.raises(TypeError, match="packed int4 weights must be int32"):
        dequant(backend, p.view(torch.float32), s)
    with pytest.raises(ValueError, match=r"scale has shape \(4, 1\), expected \(4, 2\)"):
        dequant(backend, p, s[:, :1])


def test_kernel_and_twin_agree_bit_for_bit():
    """Every rule, dtype and group size on one mixed tensor (zero rows, tiny and huge rows)."""
    tw, tr = Backend("torch"), Backend("triton")
    for dtype in DTYPES:
        x = ranged((2, 66, 256), dtype, seed=7)
        x[0, 3] = 0
        x[1, 5, :128] = torch.finfo(dtype).tiny  # scale subnormal
        x[1, 6, :64] = torch.finfo(dtype).tiny / 4  # input subnormal
        g = torch.Generator().manual_seed(9)
        for row, e in ((7, -88), (8, -91), (9, -125)):  # around the kernel's lift threshold (2^-90)
            x[1, row] = (torch.randn(256, generator=g) * 2.0 ** e).to(dtype)
        for rule in ("ct", "ct-cpu"):
            for group_size in (32, 128):
                a = quant(tw, x, rule=rule, group_size=group_size)
                b = quant(tr, x, rule=rule, group_size=group_size)
                assert_same(a[0], b[0])
                assert_same(a[1], b[1])
        for out_dtype in DTYPES:
            assert_same(dequant(tw, *a, group_size=group_size, out_dtype=out_dtype),
                        dequant(tr, *a, group_size=group_size, out_dtype=out_dtype))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compressed-tensors' CUDA kernel needs a GPU")
def test_ct_rule_is_compressed_tensors_on_cuda():
    """The default rule is what compressed-tensors computes on CUDA (its Triton `_quantize_kernel`)."""
    c = ct()
    x = ranged((256, 1024), torch.bfloat16, seed=8).cuda()
    packed, scale = quant(Backend("triton"), x)
    g = x.unflatten(-1, (-1, 128))
    theirs_scale, _ = c.calculate_qparams(g.amin(-1), g.amax(-1), c.w4a16.weights)
    assert_same(scale, theirs_scale.cpu())
    out = c.compressor.compress({"weight": x, "weight_scale": theirs_scale}, c.w4a16)
    assert_same(packed, out["weight_packed"].cpu())
