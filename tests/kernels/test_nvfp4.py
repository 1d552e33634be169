"""quant_nvfp4 / dequant_nvfp4: Triton kernel and torch twin, bit for bit against a tiny oracle written
straight from ModelOpt's NVFP4QTensor (searchsorted on the E2M1 bounds, lookup-table dequant)."""

import pytest
import torch

import fp8norm.reference as ref
from tests.conftest import Backend

E4M3 = torch.float8_e4m3fn
# --------------------------------------------------------------------------- independent oracle
E2M1_TABLE = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])
BOUNDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])


def oracle_codes(q):
    """ModelOpt's _cast_fp4: searchsorted on the bounds, +1 on the bounds whose upper code is even."""
    a = q.abs().contiguous()
    code = torch.searchsorted(BOUNDS, a) + (a.unsqueeze(-1) == BOUNDS[[1, 3, 5]]).any(-1)
    return code.to(torch.uint8) | ((q < 0).to(torch.uint8) << 3)


def oracle_quant2d(xf, amax=None):
    """fp32 [M, N] -> (packed bytes, e4m3 scales, scale_2)."""
    m, n = xf.shape
    amax = xf.abs().max() if amax is None else torch.as_tensor(amax, dtype=torch.float32)
    s2 = amax / (6.0 * 448.0)
    s2 = torch.where(s2 == 0, torch.ones_like(s2), s2)
    g = xf.view(m, n // 16, 16)
    s = g.abs().amax(-1) / (6.0 * s2)
    s[s == 0] = 1.0
    sq = s.clamp(min=2.0 ** -9, max=448.0).to(E4M3)  # ModelOpt >= 0.45: _cast_per_block_scale_to_fp8
    d = (sq.float() * s2).unsqueeze(-1)
    q = torch.where(d == 0, torch.zeros_like(g), g / d)
    codes = oracle_codes(q).view(m, n)
    return codes[:, 0::2] | (codes[:, 1::2] << 4), sq, s2


def oracle_quant(xf, amax=None):
    if xf.dim() == 2:
        return oracle_quant2d(xf, amax)
    amax = [None] * xf.shape[0] if amax is None else torch.as_tensor(amax).float().expand(xf.shape[0])
    outs = [oracle_quant2d(x2, a) for x2, a in zip(xf, amax)]
    return tuple(torch.stack(t) for t in zip(*outs))


def oracle_dequant(packed, ws, s2, out_dtype=torch.float32):
    codes = torch.stack([packed & 0xF, packed >> 4], -1).flatten(-2).long()
    v = E2M1_TABLE[codes]
    d = ws.float() * (s2 if s2.dim() == 0 else s2.view(-1, 1, 1))
    return (v.unflatten(-1, (-1, 16)) * d.unsqueeze(-1)).flatten(-2).to(out_dtype)


def nearest_e2m1_code(v):
    """Brute force: the nearest of the 8 magnitudes (ties to the even code), saturating; sign = v < 0."""
    dist = (v.abs().unsqueeze(-1) - E2M1_TABLE[:8]).abs()
    best = dist.min(-1, keepdim=True).values
    ties = dist == best
    even = ties & (torch.arange(8) % 2 == 0)
    code = torch.where(even.any(-1), even.float().argmax(-1), ties.float().argmax(-1))
    return code.to(torch.uint8) | ((v < 0).to(torch.uint8) << 3)


# --------------------------------------------------------------------------- helpers


def quant(backend, x, **kw):
    for k in ("src_scale_inv", "global_amax"):
        if isinstance(kw.get(k), torch.Tensor):
            kw[k] = kw[k].to(backend.device)
    p, w, s2 = backend.impl.quant_nvfp4(x.to(backend.device), **kw)
    return p.cpu(), w.cpu(), s2.cpu()


def dequant(backend, p, w, s2, **kw):
    return backend.impl.dequant_nvfp4(p.to(backend.device), w.to(backend.device), s2.to(backend.device),
                                      **kw).cpu()


def b(t):
    return t.view(torch.uint8)


def assert_same(got, want):
    (p, w, s2), (p_r, w_r, s2_r) = got, want
    assert p.dtype == torch.uint8 and w.dtype == E4M3 and s2.dtype == torch.float32
    assert torch.equal(p, p_r), f"{int((p != p_r).sum())} packed bytes differ"
    assert torch.equal(b(w), b(w_r)), f"{int((b(w) != b(w_r)).sum())} scale bytes differ"
    assert torch.equal(s2, s2_r)


def mixed_input(shape, dtype, seed=0):
    """Per-row and per-group magnitudes over ~1e-4..1e4, one all-zero group and one group so small that
    its e4m3 scale rounds to zero."""
    g = torch.Generator().manual_seed(seed)
    *lead, m, n = shape
    x = torch.randn(shape, generator=g)
    x *= torch.exp(torch.empty((*lead, m, 1)).uniform_(-5, 5, generator=g))
    x *= torch.exp(torch.empty((*lead, m, n // 16)).uniform_(-2, 2, generator=g)).repeat_interleave(16, -1)
    if m > 2 and n > 32:
        x[..., 1, 16:32] = 0
        x[..., 2, :16] = x[..., 2, :].abs().amax(-1, keepdim=True) * 1e-9 * torch.linspace(-1, 1, 16)
    return x.to(dtype)


def exact_group_input(vals):
    """Groups of [6.0, 15 values]: with global_amax 2688 scale_2 = 1 and every scale is 1, so q = x."""
    vals = list(vals)
    vals += [0.0] * (-len(vals) % 15)
    rows = [[6.0] + vals[i:i + 15] for i in range(0, len(vals), 15)]
    return torch.tensor(rows, dtype=torch.float32).view(1, -1)


def quant_exact(backend, vals):
    x = exact_group_input(vals)
    p, w, s2 = quant(backend, x, global_amax=torch.tensor(2688.0))
    assert float(s2) == 1.0 and (w.float() == 1.0).all()
    codes = torch.stack([p & 0xF, p >> 4], -1).flatten(-2)[0]
    keep = torch.arange(x.shape[1]) % 16 != 0  # drop the 6.0 pins
    return codes[keep][:len(vals)]


# --------------------------------------------------------------------------- E2M1 rounding and packing


def test_every_representable_value(backend):
    vals = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    vals += [-v for v in vals[1:]]
    assert quant_exact(backend, vals).tolist() == list(range(8)) + list(range(9, 16))


def test_every_midpoint_ties_to_even(backend):
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    expect = [0, 2, 2, 4, 4, 6, 6]  # the even code of each neighbour pair
    codes = quant_exact(backend, mids + [-v for v in mids])
    assert codes.tolist() == expect + [c | 8 for c in expect]


def test_rounding_matches_brute_force_nearest(backend):
    g = torch.Generator().manual_seed(1)
    vals = torch.cat([torch.empty(400).uniform_(-6, 6, generator=g),
                      torch.tensor([0.2499, 0.2501, 0.7499, 0.7501, 2.4999, 2.5001, 4.9999, 5.0001, 5.99])])
    codes = quant_exact(backend, vals.tolist())
    assert torch.equal(codes, nearest_e2m1_code(vals))
    assert torch.equal(codes, oracle_codes(vals))


def test_saturation_above_six(backend):
    # scale_2 = 2^-6 and group amax 100: s = 100 / (6 * 2^-6) > 448 saturates, so d = 448 * 2^-6 = 7.
    x = torch.tensor([[100.0, -50.0, 1.0, 42.0, 34.9, -24.6] + [0.0] * 10])
    p, w, s2 = quant(backend, x, global_amax=torch.tensor(2688.0 * 2 ** -6))
    assert float(s2) == 2 ** -6 and w.float().tolist() == [[448.0]]
    codes = torch.stack([p & 0xF, p >> 4], -1).flatten()[:6].tolist()
    assert codes == [7, 15, 0, 7, 6, 14]  # 14.3 -> 6, -7.1 -> -6, 0.14 -> 0, 6, 4.99 -> 4, -3.51 -> -4


def test_signs_and_negative_zero(backend):
    # ModelOpt's sign bit is `q < 0`: -0.0 packs as 0x0, a negative that rounds to 0 as 0x8.
    codes = quant_exact(backend, [-0.0, 0.0, -0.2, 0.2, -0.25, -0.26, -1e-30])
    assert codes.tolist() == [0x0, 0x0, 0x8, 0x0, 0x8, 0x9, 0x8]
    # Code 8 dequantizes to -0.0.
    p = torch.tensor([[0x08, 0x80, 0x98, 0, 0, 0, 0, 0]], dtype=torch.uint8)
    y = dequant(backend, p, torch.ones(1, 1).to(E4M3), torch.tensor(1.0), out_dtype=torch.float32)[0]
    assert y[:6].tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, -0.5]
    assert torch.signbit(y[:6]).tolist() == [True, False, False, True, True, True]


def test_packing_order_on_hand_built_bytes(backend):
    # Pinned group [6, 0.5, -6, 1.5, 3, -0.5, 4, -1]: codes 7, 1, 15, 3, 5, 9, 6, 10; element 2k low nibble.
    x = torch.tensor([[6.0, 0.5, -6.0, 1.5, 3.0, -0.5, 4.0, -1.0] + [0.0] * 8])
    p, w, s2 = quant(backend, x, global_amax=torch.tensor(2688.0))
    assert p[0].tolist() == [0x17, 0x3F, 0x95, 0xA6, 0, 0, 0, 0]
    y = dequant(backend, p, w, s2, out_dtype=torch.float32)
    assert torch.equal(y, x)


# --------------------------------------------------------------------------- bit-exact against the oracle

SHAPES = [(1, 16), (7, 48), (65, 80), (64, 256), (3, 33, 112)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_bit_exact_vs_oracle(backend, shape, dtype):
    x = mixed_input(shape, dtype, seed=sum(shape))
    got = quant(backend, x)
    want = oracle_quant(x.float())
    assert_same(got, want)
    assert got[0].shape == (*shape[:-1], shape[-1] // 2) and got[1].shape == (*shape[:-1], shape[-1] // 16)
    assert got[2].shape == (() if len(shape) == 2 else (shape[0],))
    for out_dtype in DTYPES:
        y = dequant(backend, *got, out_dtype=out_dtype)
        assert y.dtype == out_dtype and torch.equal(y, oracle_dequant(*want, out_dtype=out_dtype))


def test_backends_agree_bit_for_bit():
    x = mixed_input((2, 50, 208), torch.bfloat16, seed=3)
    t, r = Backend("triton"), Backend("torch")
    a, c = quant(t, x), quant(r, x)
    assert_same(a, c)
    for out_dtype in DTYPES:
        ya, yc = dequant(t, *a, out_dtype=out_dtype), dequant(r, *c, out_dtype=out_dtype)
        assert torch.equal(ya.view(torch.uint8) if out_dtype != torch.float32 else ya.view(torch.int32),
                           yc.view(torch.uint8) if out_dtype != torch.float32 else yc.view(torch.int32))


def test_non_contiguous_input(backend):
    x = mixed_input((40, 96), torch.bfloat16, seed=9).t().contiguous().t()  # strides (1, 40)
    assert x.stride() == (1, 40)
    assert_same(quant(backend, x), oracle_quant(x.float()))


# --------------------------------------------------------------------------- FP8 (block-scaled) source


def fp8_source(shape, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x7E  # no NaN codes
    return codes.view(E4M3)


def expand_blocks(s, block, shape):
    m, n = shape[-2:]
    return s.float().repeat_interleave(block[0], -2).repeat_interleave(block[1], -1)[..., :m, :n]


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float8_e8m0fnu],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape,block", [((130, 144), (128, 128)), ((2, 40, 96), (32, 48))],
                         ids=["130x144", "2x40x96-blk32x48"])
def test_fp8_source_equals_quantizing_the_dequantized_tensor(backend, shape, block, scale_dtype):
    q = fp8_source(shape, seed=4)
    g = torch.Generator().manual_seed(5)
    sshape = (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))
    if scale_dtype == torch.float8_e8m0fnu:
        s = torch.exp2(torch.randint(-12, 4, sshape, generator=g).float()).to(scale_dtype)
    else:
        s = (torch.rand(sshape, generator=g) * 0.01 + 1e-5).to(scale_dtype)
    xf = q.float() * expand_blocks(s, block, shape)  # the fp32 dequantized values
    got = quant(backend, q, src_scale_inv=s, src_block_size=block)
    assert_same(got, quant(backend, xf))
    assert_same(got, oracle_quant(xf))
    amax = ref.nvfp4_amax(q, src_scale_inv=s, src_block_size=block)
    assert torch.equal(amax, xf.abs().amax((-2, -1)))
    if block == (128, 128) and scale_dtype != torch.bfloat16:  # the same values as dequant_fp8_block's
        assert torch.equal(ref.dequant_fp8_block(q, s.float(), out_dtype=torch.float32), xf)


# --------------------------------------------------------------------------- zeros, round trip, scales


def test_zero_tensor(backend):
    for shape in [(5, 32), (2, 3, 16)]:
        p, w, s2 = quant(backend, torch.zeros(shape, dtype=torch.bfloat16))
        assert (p == 0).all() and (w.float() == 1.0).all()  # ModelOpt: zero group scale -> 1.0
        assert (s2 == 1.0).all() and s2.shape == (() if len(shape) == 2 else (2,))
        assert (dequant(backend, p, w, s2) == 0).all()
    p, w, s2 = quant(backend, torch.ones(4, 32), global_amax=torch.tensor(0.0))  # given zero amax
    assert float(s2) == 1.0 and torch.isfinite(w.float()).all()


def test_zero_and_underflowing_groups(backend):
    """A group whose scale underflows e4m3 keeps the smallest scale, 2^-9 (code 0x01), as ModelOpt >= 0.45
    does (`clamp(min=2**-9, max=448)` before the cast): its values quantize against that scale."""
    x = torch.zeros(2, 48)
    x[0, :16] = torch.linspace(-1, 1, 16)
    x[0, 16:32] = 1e-8 * torch.linspace(-1, 1, 16)  # s = 1e-8 * 448 is below e4m3's smallest subnormal
    d = torch.tensor(2.0 ** -9) * (torch.tensor(1.0) / 2688.0)  # the group's divisor, in fp32
    x[0, 17] = -2 * d  # q = -2.0: code 0xC
    p, w, s2 = quant(backend, x)
    assert torch.equal(s2, torch.tensor(1.0) / 2688.0)
    assert b(w)[0].tolist() == [b(torch.tensor(448.0).to(E4M3)).item(), 0x01, 0x38]
    assert (b(w)[1] == 0x38).all()  # all-zero groups: scale 1.0
    want = oracle_codes(x[0, 16:32] / d)
    codes = torch.stack([p[0, 8:16] & 0xF, p[0, 8:16] >> 4], -1).flatten()
    assert torch.equal(codes, want) and codes[1].item() == 0xC
    assert (p[0, 16:] == 0).all() and (p[1] == 0).all()
    y = dequant(backend, p, w, s2, out_dtype=torch.float32)
    assert torch.isfinite(y).all() and (y[:, 32:] == 0).all()


def test_round_trip_error_within_half_a_step(backend):
    x = mixed_input((3, 40, 64), torch.float32, seed=17)
    p, w, s2 = quant(backend, x)
    y = dequant(backend, p, w, s2, out_dtype=torch.float32)
    d = (w.float() * s2.view(-1, 1, 1)).repeat_interleave(16, -1)
    a = x.abs() / torch.where(d == 0, 1.0, d)
    half_step = torch.where(a <= 2, 0.25, torch.where(a <= 4, 0.5, 1.0))
    bound = torch.where(a > 6, (a - 6) * d, half_step * d) + 1e-6 * x.abs()  # + fp32 slack
    bound = torch.where(d == 0, x.abs(), bound)  # underflowed groups: zero out
    assert ((y - x).abs() <= bound).all()
    # Rounding a normal e4m3 scale moves it by at most 1/16 of itself, so |x| / d stays <= 6 * 16/15;
    # subnormal scales (groups far below the tensor's amax) are coarser.
    normal = w.float().repeat_interleave(16, -1) >= 2 ** -6
    assert (a[normal] <= 6 * 16 / 15).all() and (a[normal] > 6).any()


@pytest.mark.parametrize("shape", [(40, 64), (3, 20, 32)], ids=["2d", "3d"])
def test_given_global_amax_is_honoured(backend, shape):
    x = mixed_input(shape, torch.bfloat16, seed=21)
    amax = ref.nvfp4_amax(x)
    assert torch.equal(amax, x.float().abs().amax((-2, -1)))
    _, _, s2 = quant(backend, x)
    assert torch.equal(s2, amax / 2688.0)
    joint = torch.tensor(3.0) * x.float().abs().max()  # e.g. the amax of fused q/k/v
    got = quant(backend, x, global_amax=joint)
    assert torch.equal(got[2], (joint / 2688.0).expand(s2.shape))
    assert_same(got, oracle_quant(x.float(), joint))
    if len(shape) == 3:
        per_expert = torch.tensor([1.0, 2.0, 3.0]) * amax
        got = quant(backend, x, global_amax=per_expert)
        assert torch.equal(got[2], per_expert / 2688.0)
        want = [oracle_quant(x[e].float(), per_expert[e]) for e in range(3)]
        assert_same(got, tuple(torch.stack(t) for t in zip(*want)))


def test_fused_tensors_share_scale_2(backend):
    parts = [mixed_input((16, 32), torch.bfloat16, seed=s) for s in (1, 2, 3)]
    joint = torch.stack([ref.nvfp4_amax(t) for t in parts]).max()
    s2s = [quant(backend, t, global_amax=joint)[2] for t in parts]
    assert all(torch.equal(s, s2s[0]) for s in s2s)
    assert_same(quant(backend, torch.cat(parts), global_amax=joint),
                tuple(torch.cat(t) if t[0].dim() else t[0]
                      for t in zip(*[quant(backend, t, global_amax=joint) for t in parts])))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_input_raises(backend, bad):
    x = torch.randn(40, 64)
    x[33, 50] = bad
    with pytest.raises(ValueError, match="non-finite"):
        quant(backend, x)
    with pytest.raises(ValueError, match=r"non-finite .* index \(33, 3\)"):
        quant(backend, x, global_amax=torch.tensor(4.0))
    x3 = torch.randn(2, 8, 32, dtype=torch.bfloat16)
    x3[1, 7, 20] = bad
    with pytest.raises(ValueError, match=r"expert 1"):
        quant(backend, x3)
    with pytest.raises(ValueError, match=r"index \(1, 7, 1\)"):
        quant(backend, x3, global_amax=torch.ones(2))


def test_nan_in_fp8_source_raises(backend):
    q = fp8_source((8, 32), seed=6)
    b(q)[3, 3] = 0x7F
    with pytest.raises(ValueError, match="non-finite"):
        quant(backend, q, src_scale_inv=torch.ones(1, 1))
    with pytest.raises(ValueError, match="non-finite"):
        quant(backend, q, src_scale_inv=torch.ones(1, 1), global_amax=torch.tensor(1.0))


def test_argument_errors(backend):
    with pytest.raises(ValueError, match=r"\(4, 40\)"):
        quant(backend, torch.ones(4, 40))  # N % 16 != 0
    with pytest.raises(TypeError):
        quant(backend, torch.ones(4, 32).to(E4M3))  # FP8 without its scales
    with pytest.raises(TypeError):
        quant(backend, torch.ones(4, 32), src_scale_inv=torch.ones(1, 1))
    with pytest.raises(ValueError):
        quant(backend, torch.ones(4, 32).to(E4M3), src_scale_inv=torch.ones(2, 1))  # wrong shape
    with pytest.raises(ValueError):
        quant(backend, torch.ones(2, 4, 32), global_amax=torch.ones(3))
    with pytest.raises(ValueError):
        quant(backend, torch.ones(4, 32), global_amax=torch.tensor(-1.0))
    with pytest.raises(TypeError):
        quant(backend, torch.ones(4, 32, dtype=torch.int32))
    with pytest.raises(ValueError):
        quant(backend, torch.ones(32))
    with pytest.raises(ValueError):
        dequant(backend, torch.zeros(4, 16, dtype=torch.uint8), torch.ones(4, 3).to(E4M3), torch.tensor(1.0))


def test_empty_rows(backend):
    p, w, s2 = quant(backend, torch.zeros(0, 32, dtype=torch.bfloat16))
    assert p.shape == (0, 16) and w.shape == (0, 2) and float(s2) == 1.0
    assert dequant(backend, p, w, s2).shape == (0, 32)


def test_tiny_global_amax_is_exact(backend):
    """amax ~1e-30 (scale_2 below 2^-100): the GPU path's reciprocals would leave fp32's normal range,
    so the wrapper quantizes again with IEEE divisions; the bytes still match the formula."""
    x = mixed_input((3, 20, 64), torch.float32, seed=31) * 1e-30
    assert_same(quant(backend, x), oracle_quant(x.float()))
    assert_same(quant(backend, x[0], global_amax=torch.tensor(1e-35)), oracle_quant(x[0].float(), 1e-35))
