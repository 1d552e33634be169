"""Each conversion's kernels: GB/s (bytes read + written) and the ratio to the torch twin, one run.

On CUDA: Triton (fp8norm.kernels) vs the twin on the GPU; on CPU the twin alone (the Triton
interpreter is no benchmark).

    python -m pytest benchmarks/test_bench_convert.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

import fp8norm.reference as twin

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SHAPE = (7168, 2048) if CUDA else (2048, 2048)
BACKENDS = ["torch"] + (["triton"] if CUDA else [])
_results: dict[tuple[str, str], float] = {}


def _impl(backend):
    if backend == "torch":
        return twin
    import fp8norm.kernels

    return fp8norm.kernels


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(SHAPE, generator=g) * 0.02).to(torch.bfloat16)
    q, s = twin.quant_fp8_block(x)
    return {k: v.to(DEVICE) for k, v in {"x": x, "q": q, "s": s}.items()}


CONVERSIONS = {
    # name: (function of (impl, inputs), bytes moved)
    "fp8->bf16": (lambda m, i: m.dequant_fp8_block(i["q"], i["s"]), lambda n: n + 2 * n),
    "fp8->fp8-ue8m0": (lambda m, i: m.quant_fp8_block(i["q"], scale_fmt="ue8m0", x_scale_inv=i["s"]), lambda n: 2 * n),
    "bf16->nvfp4": (lambda m, i: m.quant_nvfp4(i["x"]), lambda n: 2 * n + n // 2 + n // 16),
    "fp8->nvfp4": (lambda m, i: m.quant_nvfp4(i["q"], src_scale_inv=i["s"]), lambda n: n + n // 2 + n // 16),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("conversion", list(CONVERSIONS))
def test_conversion(benchmark, inputs, conversion, backend, capsys):
    fn, nbytes = CONVERSIONS[conversion]
    impl = _impl(backend)

    def run():
        fn(impl, inputs)
        if CUDA:
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=10, warmup_rounds=2)
    t = benchmark.stats.stats.min
    _results[(conversion, backend)] = t
    gbps = nbytes(SHAPE[0] * SHAPE[1]) / t / 1e9
    base = _results.get((conversion, "torch"))
    ratio = "" if base is None or backend == "torch" else f"  {base / t:6.1f}x the torch twin"
    benchmark.extra_info.update(gb_per_s=gbps)
    with capsys.disabled():
        print(f"\n  {conversion:<16} {backend:<7} {SHAPE} on {DEVICE}: {t * 1e3:8.2f} ms {gbps:7.2f} GB/s{ratio}")
