"""Block-FP8 quant / dequant throughput: Triton kernel (CUDA), chunked torch twin, naive torch, compile.

Not part of the test run (pyproject's testpaths is tests/). Run:

    python -m pytest benchmarks/ --benchmark-only

Cases, backends, timing and the summary table printed at the end live in benchmarks/conftest.py.
Tests run in file order: the copy baselines first (they need the memory to themselves on a GPU),
then every backend of every case, then the twin-vs-naive speedup check.
"""

from __future__ import annotations

import pytest

# torch.compile's first call trips a DeprecationWarning inside torch itself (torch.jit.script_method).
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def test_copy_baseline(harness, case, benchmark):
    """Device copy of the same byte count as the op: the bandwidth ceiling for `% copy`."""
    harness.bench_copy(case, benchmark)


def test_quant(harness, case, backend, benchmark):
    harness.bench("quant", case, backend, benchmark)


def test_dequant(harness, case, backend, benchmark):
    harness.bench("dequant", case, backend, benchmark)


def test_twin_speedup_vs_naive(harness, op, benchmark):
    """On CPU the chunked twin must beat the naive whole-tensor formula by --fp8-min-speedup (2.5x).

    Both timed back to back on the 18432x7168 case (shrunk on CPU). The bar is the issue's: the
    measured margin is far larger for quant (~5-10x), so noise on a shared 2-core box does not trip it.
    Judged on the better of median/median and min/min, to be robust to a noisy neighbour.
    """
    ratio, ratio_min = harness.speedup(op, benchmark)
    if harness.cuda or benchmark.disabled:
        return  # the requirement is the CPU's; one round (--benchmark-disable) is too noisy to judge
    need = harness.config.getoption("--fp8-min-speedup")
    assert max(ratio, ratio_min) >= need, (
        f"{op}: the chunked twin is only {ratio:.2f}x (median) / {ratio_min:.2f}x (min) faster than "
        f"the naive whole-tensor torch formula; the requirement is >= {need}x on CPU")
