"""Subnormal inputs and outputs: the interpreted Triton kernels against their torch twins, bit for bit,
for MX (MXFP8, MXFP4) and per-channel FP8, quantize and dequantize, bf16 and fp16. The interpreter's
bf16 <-> fp32 conversion flushes bf16 subnormals; the kernels emulate the exact conversion under it
(kernels/_device.py widen_to_f32, cast_rne), the twin is the truth."""

import pytest
import torch

from tests.conftest import Backend

TWIN, KERNEL = Backend("torch"), Backend("triton")
E4M3 = torch.float8_e4m3fn


def subnormal_rows(dtype, rows=48, cols=128, seed=0):
    """Rows of the dtype's subnormals (every 32-block all subnormal), of subnormals beside normals a few
    binades up, and of single subnormals in zero rows."""
    g = torch.Generator().manual_seed(seed)
    tiny = torch.finfo(dtype).tiny
    x = (torch.rand(rows, cols, generator=g) * 2 - 1) * tiny
    x[rows // 3: 2 * rows // 3] *= torch.pow(2.0, torch.randint(0, 12, (rows // 3, cols), generator=g))
    x[2 * rows // 3:] = 0
    x[2 * rows // 3:, ::37] = tiny / 3
    x = x.to(dtype)
    assert int(((x != 0) & (x.abs() < tiny)).sum()) > rows * cols // 4
    return x


def bits(t):
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def assert_bit_exact(mine, twin):
    for a, b in zip(mine, twin):
        assert a.dtype == b.dtype and torch.equal(bits(a.cpu()), bits(b)), int((bits(a.cpu()) != bits(b)).sum())


@pytest.mark.parametrize("rule", ["rceil", "ocp", "ct"])
@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mx_quantize_subnormals(dtype, fmt, rule):
    x = subnormal_rows(dtype)
    assert_bit_exact(KERNEL.impl.quant_mx(x, fmt=fmt, rule=rule), TWIN.impl.quant_mx(x, fmt=fmt, rule=rule))


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mx_dequantize_to_subnormals(dtype, fmt):
    """Scale codes whose products land in the output dtype's subnormal range (bf16: 2^-127.., fp16: 2^-24..)."""
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 256, (48, 128 if fmt == "mxfp8" else 64), dtype=torch.uint8, generator=g)
    if fmt == "mxfp8":
        codes[(codes & 0x7F) == 0x7F] = 0x3C
        codes = codes.view(E4M3)
    low = 0 if dtype == torch.bfloat16 else 100  # up to 8 binades below the smallest normal
    scale = torch.randint(low, low + 8, (48, 4), dtype=torch.uint8, generator=g)
    out = TWIN.impl.dequant_mx(codes, scale, fmt=fmt, out_dtype=dtype)
    assert int(((out != 0) & (out.abs() < torch.finfo(dtype).tiny)).sum()) > 300
    assert_bit_exact([KERNEL.impl.dequant_mx(codes, scale, fmt=fmt, out_dtype=dtype)], [out])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_channel_quantize_and_dequantize_subnormals(dtype):
    x = subnormal_rows(dtype)
    for kw in ({}, {"scale_dtype": torch.bfloat16}, {"scale_fmt": "ue8m0"}):
        assert_bit_exact(KERNEL.impl.quant_fp8_channel(x, **kw), TWIN.impl.quant_fp8_channel(x, **kw))
    q, _ = TWIN.impl.quant_fp8_channel(x)
    g = torch.Generator().manual_seed(2)
    exps = torch.randint(-140, -120, (48, 1), generator=g) if dtype == torch.bfloat16 else \
        torch.randint(-30, -14, (48, 1), generator=g)
    scale = torch.pow(2.0, exps.float()) * (1 + torch.rand(48, 1, generator=g))
    out = TWIN.impl.dequant_fp8_channel(q, scale, out_dtype=dtype)
    assert int(((out != 0) & (out.abs() < torch.finfo(dtype).tiny)).sum()) > 500
    assert_bit_exact([KERNEL.impl.dequant_fp8_channel(q, scale, out_dtype=dtype)], [out])
