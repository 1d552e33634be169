"""Cost of each calibration mode relative to `max` (the fused kernel) on the same tensor, one run.

    python -m pytest benchmarks/test_bench_calibrate.py --benchmark-only
"""

from __future__ import annotations


import pytest
import torch

from fp8norm.calibrate import CalibSettings, calibrated_quant

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = (7168, 2048) if DEVICE == "cuda" else (1024, 2048)
MODES = [CalibSettings("max"), CalibSettings("rms"), CalibSettings("percentile"), CalibSettings("mse", mse_grid=50)]
_times: dict[str, float] = {}


@pytest.fixture(scope="module")
def weight():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(SHAPE, generator=g) * 0.02).to(torch.bfloat16).to(DEVICE)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("calib", MODES, ids=[c.describe() for c in MODES])
def test_calibration_cost(benchmark, weight, calib, capsys):
    def run():
        calibrated_quant(weight, calib)
        _sync()

    benchmark.pedantic(run, rounds=3 if calib.mode == "mse" else 10, warmup_rounds=1)
    _times[calib.describe()] = benchmark.stats.stats.min
    base = _times.get("max")
    gbps = weight.numel() * 3 / benchmark.stats.stats.min / 1e9  # bf16 read + e4m3 written
    benchmark.extra_info.update(gb_per_s=gbps, ratio_vs_max=None if base is None else benchmark.stats.stats.min / base)
    with capsys.disabled():
        ratio = "" if base is None else f"   {benchmark.stats.stats.min / base:6.1f}x the cost of max"
        print(f"\n  {calib.describe():<16} {tuple(SHAPE)} on {DEVICE}: {benchmark.stats.stats.min * 1e3:8.1f} ms"
              f"  {gbps:6.2f} GB/s{ratio}")
