"""The new schemes' kernels (per-channel FP8, MXFP8, MXFP4; quant from bf16 and from block FP8, and
dequant): GB/s (bytes read + written) and the Triton kernel's ratio to the torch twin, one run each.

On CUDA: Triton (compiled) vs the twin on the GPU, at a DeepSeek-sized weight (tools/gpu_check.sh).
On CPU: the twin at 2048 x 2048, and the Triton kernel under the interpreter at 256 x 512 against the
twin at the same shape (the interpreter is a correctness tool: its ratio says how slow, nothing more).

And the MX scale rules' SQNR (test_mx_rule_sqnr): each rule (fp8norm.kernels.numerics.mx) on
Gaussian and heavy-tailed (fp8norm.examples.heavy_tailed) bf16 weights, MXFP8 and MXFP4, through the
twin; the figures the README and `--mx-rule`'s help quote.

    python -m pytest benchmarks/test_bench_schemes.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

import fp8norm.reference as twin
from fp8norm.examples import heavy_tailed
from fp8norm.kernels.numerics import mx

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SHAPES = {"torch": (7168, 2048) if CUDA else (2048, 2048), "triton": (7168, 2048) if CUDA else (256, 512)}
BACKENDS = ["torch", "triton"]
_results: dict[tuple[str, str, tuple], float] = {}


def _impl(backend):
    if backend == "torch":
        return twin
    import fp8norm.kernels

    return fp8norm.kernels


def _inputs(shape):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    q, s = twin.quant_fp8_block(x)
    cq, cs = twin.quant_fp8_channel(x)
    m8, e8 = twin.quant_mx(x, fmt="mxfp8")
    m4, e4 = twin.quant_mx(x, fmt="mxfp4")
    d = {"x": x, "q": q, "s": s, "cq": cq, "cs": cs, "m8": m8, "e8": e8, "m4": m4, "e4": e4}
    return {k: v.to(DEVICE) for k, v in d.items()}


KERNELS = {
    # name: (function of (impl, inputs), bytes moved for n elements)
    "bf16->fp8-channel": (lambda m, i: m.quant_fp8_channel(i["x"]), lambda n: 2 * n + n),
    "fp8->fp8-channel": (lambda m, i: m.quant_fp8_channel(i["q"], src_scale_inv=i["s"]), lambda n: 2 * n),
    "fp8-channel->bf16": (lambda m, i: m.dequant_fp8_channel(i["cq"], i["cs"]), lambda n: n + 2 * n),
    "bf16->mxfp8": (lambda m, i: m.quant_mx(i["x"], fmt="mxfp8"), lambda n: 2 * n + n + n // 32),
    "bf16->mxfp4": (lambda m, i: m.quant_mx(i["x"], fmt="mxfp4"), lambda n: 2 * n + n // 2 + n // 32),
    "fp8->mxfp4": (lambda m, i: m.quant_mx(i["q"], fmt="mxfp4", src_scale_inv=i["s"]),
                   lambda n: n + n // 2 + n // 32),
    "mxfp8->bf16": (lambda m, i: m.dequant_mx(i["m8"], i["e8"], fmt="mxfp8"), lambda n: n + n // 32 + 2 * n),
    "mxfp4->bf16": (lambda m, i: m.dequant_mx(i["m4"], i["e4"], fmt="mxfp4"), lambda n: n // 2 + n // 32 + 2 * n),
}
_inputs_cache: dict[tuple, dict] = {}


def _timed(benchmark, fn, impl, inputs, rounds):
    def run():
        fn(impl, inputs)
        if CUDA:
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1)
    return benchmark.stats.stats.min


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_scheme_kernel(benchmark, kernel, backend, capsys):
    fn, nbytes = KERNELS[kernel]
    shape = SHAPES[backend]
    inputs = _inputs_cache.setdefault(shape, _inputs(shape))
    t = _timed(benchmark, fn, _impl(backend), inputs, rounds=10 if backend == "torch" or CUDA else 1)
    _results[(kernel, backend, shape)] = t
    gbps = nbytes(shape[0] * shape[1]) / t / 1e9
    ratio = ""
    if backend == "triton":
        base = _results.get((kernel, "torch", shape))
        if base is None:  # the twin at the interpreter's shape, for a like-for-like ratio
            fn(twin, {k: v.cpu() for k, v in inputs.items()})
            import time

            t0 = time.perf_counter()
            fn(twin, inputs)
            base = time.perf_counter() - t0
        ratio = f"  {base / t:8.3f}x the torch twin" + ("" if CUDA else " (interpreter)")
    benchmark.extra_info.update(gb_per_s=gbps)
    with capsys.disabled():
        print(f"\n  {kernel:<18} {backend:<7} {shape} on {DEVICE}: {t * 1e3:9.2f} ms {gbps:8.3f} GB/s{ratio}")


RULE_SHAPE = (2048, 4096)  # 262144 blocks of 32: SQNR to +-0.01 dB
_weights: dict[str, torch.Tensor] = {}


def _rule_weights(kind: str) -> torch.Tensor:
    if kind not in _weights:
        g = torch.Generator().manual_seed(0)
        x = heavy_tailed(RULE_SHAPE, g) if kind == "heavy-tailed" else torch.randn(RULE_SHAPE, generator=g) * 0.02
        _weights[kind] = x.to(torch.bfloat16).to(DEVICE)
    return _weights[kind]


@pytest.mark.parametrize("rule", mx.SCALE_RULES)
@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4"])
@pytest.mark.parametrize("weights", ["gaussian", "heavy-tailed"])
def test_mx_rule_sqnr(benchmark, weights, fmt, rule, capsys):
    """SQNR = 10 log10(sum x^2 / sum (x - dequant)^2) of one rule, and the share of blocks whose max
    element saturates (clips)."""
    x = _rule_weights(weights)
    out = {}

    def run():
        out["q"] = twin.quant_mx(x, fmt=fmt, rule=rule)

    benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    e, s = out["q"]
    xd = x.double()
    err = xd - twin.dequant_mx(e, s, fmt=fmt, out_dtype=torch.float32).double()
    sqnr = 10 * torch.log10(xd.square().sum() / err.square().sum()).item()
    elem_max = 448.0 if fmt == "mxfp8" else 6.0
    amax = xd.view(*RULE_SHAPE[:-1], -1, mx.MX_BLOCK).abs().amax(-1)
    clipped = (amax / torch.pow(2.0, s.double() - 127) > elem_max).double().mean().item()
    benchmark.extra_info.update(sqnr_db=sqnr, clipped_blocks=clipped)
    with capsys.disabled():
        print(f"\n  {fmt} {weights:<12} rule={rule:<5} SQNR {sqnr:7.3f} dB, max clipped in {clipped:6.2%} of blocks")
