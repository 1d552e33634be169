"""The kernels' bit-level helpers, run on CPU through the Triton interpreter, including the helpers and
branches only the compiled (GPU) path uses: NaN payloads a GPU produces, the reciprocal-based
division, the E2M1 encoder, the NaN-propagating amax. And: the per-launch choice between compiled and
interpreted kernels leaves the process (environment, other libraries' kernels) untouched."""

import os
import subprocess
import sys

import pytest
import torch
import triton.language as tl

from fp8norm.kernels.numerics import e2m1
from fp8norm.kernels import kernel
from fp8norm.kernels._device import amax_nan, cast_rne, not_finite
from fp8norm.kernels.quant_nvfp4 import divide_by, e2m1_code

# NaN as GPUs make them: the canonical 0x7FFFFFFF (max.NaN, div), 0x7FFFE000 (f16 NaN widened to f32),
# negative payloads, and the interpreter's 0x7FC00000.
GPU_NANS = [0x7FFFFFFF, 0x7FFFE000, 0xFFFFFFFF, 0xFFFFE000, 0x7FC00000, 0x7F800001]


def f32_from_bits(bits):
    return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)


@kernel
def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(y_ptr + offs, cast_rne(x, y_ptr.dtype.element_ty, True), mask=offs < n)


def _launch_cast(x, dtype):
    y = torch.empty(x.shape, dtype=dtype)
    _cast_kernel[(1,)](x, y, x.numel(), BLOCK=triton_block(x.numel()))
    return y


def triton_block(n):
    return max(16, 1 << (n - 1).bit_length())


def test_bf16_rounding_keeps_gpu_nan_payloads():
    """The interpreter's fp32 -> bf16 rounding adds 0x7FFF to the bits: without the NaN guard
    0x7FFFFFFF would carry into 0x80000000 (-0) and 0x7FFFE000 into 0x80000000 too."""
    x = f32_from_bits(GPU_NANS + [0x7F7FFFFF, 0x7F800000, 0xFF800000, 0x3F808000, 0x3F818000, 0x00000001])
    y = _launch_cast(x, torch.bfloat16)
    assert torch.isnan(y[:len(GPU_NANS)]).all()
    assert torch.equal(y[len(GPU_NANS):], x[len(GPU_NANS):].to(torch.bfloat16))  # Inf, RNE ties, subnormal


def test_fp16_output_of_gpu_nans():
    x = f32_from_bits(GPU_NANS + [0x477FF000, 0x3F801000])  # 65520 -> inf, a tie
    y = _launch_cast(x, torch.float16)
    assert torch.isnan(y[:len(GPU_NANS)]).all()
    assert torch.equal(y[len(GPU_NANS):], x[len(GPU_NANS):].to(torch.float16))


@kernel
def _amax_kernel(x_ptr, out_ptr, bad_ptr, GROUP: tl.constexpr, NG: tl.constexpr, GPU_PATH: tl.constexpr,
                 INTERPRET: tl.constexpr):
    x = tl.load(x_ptr + tl.arange(0, NG)[:, None] * GROUP + tl.arange(0, GROUP)[None, :])
    amax = amax_nan(tl.abs(x), 1, not GPU_PATH)
    tl.store(out_ptr + tl.arange(0, NG), amax)
    tl.store(bad_ptr + tl.arange(0, NG), not_finite(amax).to(tl.int8))


@pytest.mark.parametrize("gpu_path", [False, True], ids=["interpreter-path", "gpu-path"])
def test_amax_propagates_nan_and_flags_nonfinite(gpu_path):
    x = torch.randn(4, 16)
    x[1, 3] = f32_from_bits(0x7FFFE000)
    x[2, 15] = float("-inf")
    x[3, 0] = f32_from_bits(0xFFFFFFFF)
    out, bad = torch.empty(4), torch.empty(4, dtype=torch.int8)
    _amax_kernel[(1,)](x, out, bad, GROUP=16, NG=4, GPU_PATH=gpu_path)
    assert out[0] == x[0].abs().max() and torch.isnan(out[1]) and out[2] == float("inf") and torch.isnan(out[3])
    assert bad.tolist() == [0, 1, 1, 1]


@kernel
def _divide_kernel(x_ptr, d_ptr, q_ptr, NG: tl.constexpr, GROUP: tl.constexpr, INTERPRET: tl.constexpr):
    x = tl.load(x_ptr + tl.arange(0, NG)[:, None] * GROUP + tl.arange(0, GROUP)[None, :])
    d = tl.load(d_ptr + tl.arange(0, NG))
    q = divide_by(x[None, :, :], tl.math.div_rn(1.0, d)[None, :, None], d[None, :, None])
    tl.store(q_ptr + tl.arange(0, NG)[:, None] * GROUP + tl.arange(0, GROUP)[None, :], tl.reshape(q, (NG, GROUP)))


@kernel
def _fma_kernel(a_ptr, out_ptr, INTERPRET: tl.constexpr):
    a = tl.load(a_ptr + tl.arange(0, 4))
    tl.store(out_ptr + tl.arange(0, 4), tl.fma(a, a, -a * a))


def interpreter_fma_is_fused() -> bool:
    """Older interpreters (triton 3.6) round a*b before adding c; the GPU's fma.rn does not."""
    a = torch.full((4,), 1.0 + 2.0 ** -12)
    out = torch.empty(4)
    _fma_kernel[(1,)](a, out)
    return bool((out == 2.0 ** -24).all())  # a*a - RN(a*a), exactly


def test_reciprocal_division_is_correctly_rounded():
    """The GPU path's x / d (one reciprocal per group, two FMAs per element) against IEEE division,
    on random values and on quotients at and next to every E2M1 rounding boundary."""
    if not interpreter_fma_is_fused():
        pytest.skip("this Triton's interpreter rounds inside tl.fma: the GPU's fused FMA cannot be emulated")
    g = torch.Generator().manual_seed(0)
    ng, group = 256, 16
    d = torch.exp2(torch.empty(ng).uniform_(-100, 100, generator=g)) * torch.empty(ng).uniform_(1, 2, generator=g)
    x = torch.randn(ng, group, generator=g) * d[:, None] * torch.exp2(torch.randint(-20, 4, (ng, group),
                                                                                      generator=g).float())
    # x = b * d for boundaries b, then the fp32 neighbours of that product: quotients straddle b.
    bounds = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    b = bounds[torch.randint(0, 8, (ng, group // 2), generator=g)]
    exact = (b * d[:, None]).float()
    bits = exact.view(torch.int32)
    x[:, : group // 2] = torch.where(torch.rand(ng, group // 2, generator=g) < 0.5, bits + 1, bits - 1
                                     ).view(torch.float32)
    x[:, group // 2:] = exact * torch.where(torch.rand(ng, group // 2, generator=g) < 0.5, 1.0, -1.0)
    q = torch.empty_like(x)
    _divide_kernel[(1,)](x, d, q, NG=ng, GROUP=group)
    assert torch.equal(q.view(torch.int32), (x / d[:, None]).view(torch.int32))


@kernel
def _code_kernel(q_ptr, c_ptr, n, BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(c_ptr + offs, e2m1_code(tl.load(q_ptr + offs, mask=offs < n)).to(tl.uint8), mask=offs < n)


def test_e2m1_encoder_on_every_bf16_value_and_the_boundaries():
    """Every bf16 bit pattern (as fp32) and fp32 neighbours of each rounding boundary, against the
    searchsorted rule of fp8norm.kernels.numerics.nvfp4 (ModelOpt's)."""
    allbf16 = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    allbf16 = allbf16[~torch.isnan(allbf16)]
    b = torch.tensor(e2m1.E2M1_BOUNDS + (6.0, 1.0, 2.0, 4.0))
    nb = b.view(torch.int32)
    near = torch.cat([b, (nb + 1).view(torch.float32), (nb - 1).view(torch.float32)])
    q = torch.cat([allbf16, near, -near, torch.tensor([7.0, 1e30, float("inf"), -float("inf"), 2.0 ** -149])])
    c = torch.empty(q.shape, dtype=torch.uint8)
    block = 4096
    _code_kernel[(triton_block(q.numel()) // block or 1,)](q, c, q.numel(), BLOCK=block)
    assert torch.equal(c, e2m1.e2m1_codes(q))


THIRD_PARTY = """
import os, sys
before = dict(os.environ)
import fp8norm.kernels, fp8norm
import torch, triton, triton.language as tl
from triton.runtime.jit import JITFunction
x = torch.randn(130, 140, dtype=torch.bfloat16)
fp8norm.kernels.quant_fp8_block(x)  # an interpreted launch on CPU tensors
assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())

@triton.jit
def third_party(x_ptr):
    pass

assert type(third_party) is JITFunction, type(third_party)
print("ok")
"""


def test_import_and_launch_leave_other_triton_kernels_alone(tmp_path):
    """Importing fp8norm.kernels (and running a kernel on CPU) sets no TRITON_INTERPRET: a kernel
    another library defines afterwards is still a compiled JITFunction."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = tmp_path / "third_party.py"  # triton.jit needs its function in a file
    script.write_text(THIRD_PARTY)
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@kernel
def _stdlib_kernel(x_ptr, out_ptr, N: tl.constexpr):
    x = tl.load(x_ptr + tl.arange(0, N))
    tl.store(out_ptr, tl.max(x, 0) + tl.sum(x, 0) + tl.cdiv(N, 3))


def test_kernels_may_use_tritons_own_library_under_the_interpreter():
    """tl.max / tl.sum / tl.cdiv are compiled-only JITFunctions in a process without TRITON_INTERPRET;
    an interpreted launch swaps them for the duration of the launch only (a kernel without an
    INTERPRET argument gets none)."""
    from triton.runtime.jit import JITFunction

    x = torch.arange(8, dtype=torch.float32)
    out = torch.empty(1)
    _stdlib_kernel[(1,)](x, out, N=8)
    assert out.item() == 7 + 28 + 3
    assert type(tl.max) is JITFunction and type(tl.standard.sum) is JITFunction  # put back
