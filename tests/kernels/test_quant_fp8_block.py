"""quant_fp8_block: Triton kernel and torch twin, bit for bit against the DeepGEMM-formula oracle."""

import pytest
import torch

from fp8norm.kernels.numerics import fp8_block as nx
from tests.oracle import e4m3_values, oracle_quant

SHAPES = [(1, 1), (7, 300), (127, 129), (128, 128), (256, 384), (300, 700), (3, 200, 130)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (scale_fmt, scale_dtype): every combination the API allows.
SCALE_MODES = [
    ("float", torch.float32), ("float", torch.bfloat16),
    ("ue8m0", torch.float32), ("ue8m0", torch.bfloat16), ("ue8m0", torch.float8_e8m0fnu),
]


def mixed_input(shape, dtype, seed=0):
    """Normal values with per-row and per-column magnitudes spanning 1e-3..1e3, plus an all-zero tile."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x *= torch.exp(torch.empty(shape[:-1] + (1,)).uniform_(-7, 7, generator=g))
    x *= torch.exp(torch.empty(shape[-1:]).uniform_(-1, 1, generator=g))
    if shape[-2] > 128 and shape[-1] > 128:
        x[..., :128, :128] = 0  # a whole zero tile: finite scale, zeros out
    return x.to(dtype)


def as_bytes(q):
    return q.view(torch.uint8)


def assert_bit_exact(backend, x, **kw):
    q, s = backend.quant(x, **kw)
    q_ref, s_ref = oracle_quant(x, **{k: v for k, v in kw.items()})
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert torch.equal(as_bytes(q), q_ref), f"{int((as_bytes(q) != q_ref).sum())} q bytes differ"
    assert s.dtype == kw.get("scale_dtype", torch.float32) or kw.get("scale_inv") is not None
    assert torch.equal(s.float(), s_ref), "scale values differ"
    return q, s


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("scale_fmt,scale_dtype", SCALE_MODES, ids=lambda v: str(v).split(".")[-1])
def test_bit_exact_vs_oracle(backend, shape, dtype, scale_fmt, scale_dtype):
    x = mixed_input(shape, dtype)
    q, s = assert_bit_exact(backend, x, scale_fmt=scale_fmt, scale_dtype=scale_dtype)
    assert s.shape == nx.scale_inv_shape(shape, (128, 128))


@pytest.mark.parametrize("shape", [(300, 700), (3, 200, 130)], ids=lambda s: "x".join(map(str, s)))
def test_backends_agree_bit_for_bit(shape):
    """Triton (interpreter or GPU) and the twin: same q bytes and same scale bits, every mode."""
    from tests.conftest import Backend

    x = mixed_input(shape, torch.bfloat16, seed=3)
    for scale_fmt, scale_dtype in SCALE_MODES:
        a = Backend("triton").quant(x, scale_fmt=scale_fmt, scale_dtype=scale_dtype)
        b = Backend("torch").quant(x, scale_fmt=scale_fmt, scale_dtype=scale_dtype)
        assert torch.equal(as_bytes(a[0]), as_bytes(b[0]))
        assert torch.equal(a[1].view(torch.uint8), b[1].view(torch.uint8))


def test_zero_tiles_give_finite_scales_and_zeros(backend):
    x = torch.zeros(130, 260, dtype=torch.bfloat16)
    for scale_fmt in ("float", "ue8m0"):
        q, s = backend.quant(x, scale_fmt=scale_fmt)
        assert torch.isfinite(s).all() and (s > 0).all()
        assert (as_bytes(q) == 0).all()
    q, s = backend.quant(x, scale_fmt="float")
    assert torch.equal(s, torch.full((2, 3), torch.tensor(1e-4, dtype=torch.float32).item() / 448.0))


def _grid_midpoints():
    """Every midpoint between adjacent positive e4m3 values and the even neighbour it must round to."""
    codes, vals = e4m3_values()
    pos = codes < 0x80  # sign bit clear (keeps +0, drops -0)
    codes, vals = codes[pos], vals[pos]
    order = torch.argsort(vals)
    codes, vals = codes[order], vals[order]
    mids = (vals[:-1] + vals[1:]) / 2  # exact in fp32
    lo_even = (codes[:-1] & 1) == 0
    expect = torch.where(lo_even, codes[:-1], codes[1:])
    return mids, expect


def test_ties_to_even_on_every_midpoint(backend):
    """Scale 1 (given) so x is the scaled value itself; includes the subnormal range (steps of 2^-9)."""
    mids, expect = _grid_midpoints()
    x = torch.cat([mids, -mids]).view(1, -1)
    expect = torch.cat([expect, expect | 0x80]).view(1, -1)
    scale = torch.ones(nx.scale_inv_shape(tuple(x.shape), (128, 128)))
    q, _ = backend.quant(x, scale_inv=scale)
    assert torch.equal(as_bytes(q), expect)


def test_ties_to_even_with_computed_scale(backend):
    """amax = 448 makes sf exactly 1 on the computed path: the same midpoints must round the same."""
    mids, expect = _grid_midpoints()
    x = torch.cat([torch.tensor([448.0]), mids]).view(1, -1)
    q, s = backend.quant(x)
    assert (s == 1.0).all()
    assert torch.equal(as_bytes(q)[0, 1:], expect)


def test_carry_into_next_power_of_two_and_subnormals(backend):
    """Values the interpreter's raw fp8 cast gets wrong (127.7 -> 64), and e4m3 subnormals."""
    step = 2.0 ** -9
    vals = [127.7, 0.497, 0.00741, 15.9, 447.0, 2 ** -10, 2 ** -10 * 1.0001, 3 * step, 3.5 * step, 4.5 * step,
            7.5 * step, 2 ** -6 - step / 4, step / 3]
    expect = [128.0, 0.5, 0.0078125, 16.0, 448.0, 0.0, step, 3 * step, 4 * step, 4 * step, 8 * step, 2 ** -6, 0.0]
    x = torch.tensor([vals + [-v for v in vals]])
    q, _ = backend.quant(x, scale_inv=torch.ones(1, 1))
    assert q.float()[0].tolist() == expect + [-v for v in expect]


def test_negative_zero(backend):
    x = torch.tensor([[-0.0, 0.0, -1e-30, 1.0]], dtype=torch.float32)
    q, _ = backend.quant(x)
    assert as_bytes(q)[0].tolist() == [0x80, 0x00, 0x80, as_bytes(torch.tensor([448.0]).to(torch.float8_e4m3fn))[0]]


def test_saturation_through_given_scale(backend):
    """A small given scale pushes values past 448: they saturate to +-448 (0x7E/0xFE), never NaN."""
    x = torch.tensor([[1.0, -1.0, 500.0, -1e30, 3e38, 0.25]], dtype=torch.float32)
    scale = torch.full((1, 1), 2.0 ** -9)
    q, s = backend.quant(x, scale_inv=scale)
    assert as_bytes(q)[0].tolist() == [0x7E, 0xFE, 0x7E, 0xFE, 0x7E, 0x70]  # 0.25 -> 128, in range
    assert s is not None and torch.equal(s, scale)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float8_e8m0fnu],
                         ids=lambda d: str(d).split(".")[-1])
def test_given_scale_matches_oracle(backend, scale_dtype):
    x = mixed_input((3, 200, 130), torch.bfloat16, seed=5)
    scale = torch.exp2(torch.randint(-12, 4, (3, 2, 2)).float()).to(scale_dtype)
    q, s = backend.quant(x, scale_inv=scale)
    q_ref, _ = oracle_quant(x, scale_inv=scale)
    assert torch.equal(as_bytes(q), q_ref)
    assert s.dtype == scale_dtype


def test_given_scale_reproduces_computed_path(backend):
    x = mixed_input((256, 384), torch.bfloat16, seed=7)
    q, s = backend.quant(x, scale_fmt="ue8m0")
    q2, _ = backend.quant(x, scale_inv=s)
    assert torch.equal(as_bytes(q), as_bytes(q2))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_input_raises(backend, bad):
    x = torch.randn(200, 300)
    x[150, 260] = bad
    with pytest.raises(ValueError, match=r"non-finite .* tile index \(1, 2\)"):
        backend.quant(x)
    with pytest.raises(ValueError, match="non-finite"):
        backend.quant(x, scale_inv=torch.ones(2, 3))


def test_nonfinite_in_3d_names_expert(backend):
    x = torch.randn(3, 130, 130, dtype=torch.bfloat16)
    x[2, 0, 129] = float("nan")
    with pytest.raises(ValueError, match=r"tile index \(2, 0, 1\)"):
        backend.quant(x)


def test_non_contiguous_input(backend):
    x = mixed_input((300, 200), torch.bfloat16, seed=9).t()  # [200, 300] view, strides (1, 200)
    q, s = backend.quant(x)
    q_ref, s_ref = oracle_quant(x.contiguous())
    assert torch.equal(as_bytes(q), q_ref) and torch.equal(s, s_ref)


def test_other_block_size(backend):
    x = mixed_input((100, 70), torch.float16, seed=11)
    q, s = backend.quant(x, block_size=(32, 64), scale_fmt="ue8m0")
    q_ref, s_ref = oracle_quant(x, block_size=(32, 64), scale_fmt="ue8m0")
    assert s.shape == (4, 2)
    assert torch.equal(as_bytes(q), q_ref) and torch.equal(s, s_ref)


@pytest.mark.parametrize("kw,err", [
    (dict(scale_fmt="mx"), ValueError),
    (dict(scale_dtype=torch.float8_e8m0fnu), ValueError),  # e8m0 storage needs ue8m0
    (dict(scale_dtype=torch.float16), TypeError),
    (dict(amax_floor=0.0), ValueError),
    (dict(scale_inv=torch.ones(3, 3)), ValueError),  # wrong shape
    (dict(scale_inv=torch.zeros(1, 1)), ValueError),  # would divide by zero
])
def test_argument_errors(backend, kw, err):
    with pytest.raises(err):
        backend.quant(torch.randn(100, 100), **kw)


def test_input_errors(backend):
    with pytest.raises(TypeError):
        backend.quant(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError):
        backend.quant(torch.ones(4))


def test_ue8m0_scales_are_powers_of_two_and_not_below_float(backend):
    x = mixed_input((3, 200, 130), torch.bfloat16, seed=13)
    _, s_float = backend.quant(x)
    _, s_pow2 = backend.quant(x, scale_fmt="ue8m0")
    assert nx.is_power_of_two(s_pow2)
    assert (s_pow2 >= s_float).all() and (s_pow2 < 2 * s_float).all()


@pytest.mark.parametrize("scale_fmt,scale_dtype", SCALE_MODES, ids=lambda v: str(v).split(".")[-1])
def test_round_trip_error_bound(backend, scale_fmt, scale_dtype):
    """|dequant(quant(x)) - x| <= 2^-4 |x| wherever x/sf is in e4m3's normal range (>= 2^-6);
    below it the error is at most half a subnormal step, 2^-10 * sf."""
    x = mixed_input((3, 200, 130), torch.float32, seed=17)
    q, s = backend.quant(x, scale_fmt=scale_fmt, scale_dtype=scale_dtype)
    y = backend.dequant(q, s, out_dtype=torch.float32)
    sf = s.float().repeat_interleave(128, -2).repeat_interleave(128, -1)[..., :200, :130]
    err = (y - x).abs()
    normal = x.abs() / sf >= 2.0 ** -6
    assert (err[normal] <= 2.0 ** -4 * x.abs()[normal]).all()
    assert (err[~normal] <= 2.0 ** -10 * sf[~normal]).all()
    assert (x.abs() / sf <= 448).all()  # computed scales never saturate


@pytest.mark.parametrize("src_scale_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("scale_fmt,scale_dtype", [("ue8m0", torch.float32), ("ue8m0", torch.float8_e8m0fnu),
                                                   ("float", torch.float32)], ids=["ue8m0-f32", "ue8m0-e8m0", "float"])
def test_requantize_fp8_input_in_one_pass(backend, src_scale_dtype, scale_fmt, scale_dtype):
    """FP8 x with its block scales: the same bits as dequantizing to fp32 and quantizing (the oracle)."""
    x = mixed_input((3, 200, 130), torch.float32, seed=21)
    q_src, s_src = oracle_quant(x)
    q_src = q_src.view(torch.float8_e4m3fn)
    s_src = s_src.to(src_scale_dtype)
    q, s = backend.quant(q_src, x_scale_inv=s_src.to(backend.device), scale_fmt=scale_fmt, scale_dtype=scale_dtype)
    deq = q_src.float() * s_src.float().repeat_interleave(128, -2).repeat_interleave(128, -1)[..., :200, :130]
    q_ref, s_ref = oracle_quant(deq, scale_fmt=scale_fmt, scale_dtype=scale_dtype)
    assert torch.equal(as_bytes(q), q_ref) and torch.equal(s.float(), s_ref)


def test_fp8_input_needs_its_scales(backend):
    q = torch.zeros(4, 4, dtype=torch.float8_e4m3fn)
    with pytest.raises(TypeError, match="x_scale_inv"):
        backend.quant(q)
    with pytest.raises(TypeError, match="only for an FP8 x"):
        backend.quant(torch.zeros(4, 4), x_scale_inv=torch.ones(1, 1))


def test_requantizing_nan_codes_raises(backend):
    q = torch.zeros(4, 4, dtype=torch.uint8)
    q[1, 2] = 0x7F
    with pytest.raises(ValueError, match="non-finite"):
        backend.quant(q.view(torch.float8_e4m3fn), x_scale_inv=torch.ones(1, 1))
