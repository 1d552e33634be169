"""Cost of each calibration mode relative to `max` (the fused kernel) on the same tensor, one run,
and what each costs in accuracy (SQNR against e4m3's 31.5 dB floor) on Gaussian and on heavy-tailed
weights with outlier input channels. Prints the README's calibration-cost table.

    python -m pytest benchmarks/test_bench_calibrate.py --benchmark-only -s

Threads: chosen as the CLI chooses them (fp8norm.threads), printed with the table.
"""

from __future__ import annotations

import pytest
import torch

from fp8norm.calibrate import CalibSettings, calibrated_quant
from fp8norm.examples import heavy_tailed
from fp8norm.threads import configure_threads
from fp8norm.checks import FLOOR_SQNR_DB, compare

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = (7168, 2048) if DEVICE == "cuda" else (1024, 2048)
MODES = [CalibSettings("max"), CalibSettings("rms"), CalibSettings("percentile"), CalibSettings("mse", mse_grid=50)]
_rows: dict[str, dict] = {}
THREADS = configure_threads(io_threads=0) if DEVICE == "cpu" else None


@pytest.fixture(scope="module")
def weights():
    g = torch.Generator().manual_seed(0)
    gauss = (torch.randn(SHAPE, generator=g) * 0.02).to(torch.bfloat16)
    heavy = heavy_tailed(SHAPE, g).to(torch.bfloat16)
    return gauss.to(DEVICE), heavy.to(DEVICE)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _sqnr(x, calib) -> float:
    q, s = calibrated_quant(x, calib)
    return compare("w", "-", q.cpu(), s.cpu(), x.cpu(), (128, 128)).sqnr_db


@pytest.mark.parametrize("calib", MODES, ids=[c.describe() for c in MODES])
def test_calibration_cost(benchmark, weights, calib, capsys):
    gauss, heavy = weights

    def run():
        calibrated_quant(gauss, calib)
        _sync()

    benchmark.pedantic(run, rounds=3 if calib.mode == "mse" else 10, warmup_rounds=1)
    t = benchmark.stats.stats.min
    base = _rows.get("max", {}).get("s")
    _rows[calib.describe()] = {"s": t, "x": None if base is None else t / base,
                               "gauss": _sqnr(gauss, calib), "heavy": _sqnr(heavy, calib)}
    benchmark.extra_info.update(ratio_vs_max=_rows[calib.describe()]["x"])
    with capsys.disabled():
        if len(_rows) == len(MODES):
            _print_table()


def _print_table():
    where = f"{DEVICE}, {THREADS.describe()}" if THREADS else torch.cuda.get_device_name()
    print(f"\n\ncalibration cost, {SHAPE[0]}x{SHAPE[1]} bf16 on {where}; SQNR floor {FLOOR_SQNR_DB:.1f} dB\n")
    print("| calibration | time (ms) | vs max | SQNR Gaussian (dB) | SQNR heavy-tailed + outlier channels (dB) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in _rows.items():
        x = "1x" if r["x"] is None else f"{r['x']:.0f}x"
        print(f"| {name} | {r['s'] * 1e3:.1f} | {x} | {r['gauss']:.1f} | {r['heavy']:.1f} |")
    print()
