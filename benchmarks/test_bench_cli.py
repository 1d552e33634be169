"""Start-up of the command line: `fp8norm --help` / `--version` against the interpreter alone and
against `import torch` (what they cost before the CLI imported torch lazily). Goal: <= 0.3 s.

    python -m pytest benchmarks/test_bench_cli.py --benchmark-only -s
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

import pytest

GOAL_S = 0.3
ROUNDS = 7
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "fp8norm --version": [sys.executable, "-m", "fp8norm", "--version"],
    "fp8norm --help": [sys.executable, "-m", "fp8norm", "--help"],
    "fp8norm quantize --help": [sys.executable, "-m", "fp8norm", "quantize", "--help"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
}


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


@pytest.mark.parametrize("label", list(COMMANDS))
def test_startup(label, benchmark):
    cmd = COMMANDS[label]
    wall(cmd)  # warm the page cache
    times = [wall(cmd) for _ in range(ROUNDS)]
    benchmark.pedantic(wall, args=(cmd,), rounds=1, iterations=1)
    med, best = statistics.median(times), min(times)
    base = min(wall(COMMANDS["python -c pass"]) for _ in range(3))
    goal = "" if not label.startswith("fp8norm") else (" (goal <= 0.3 s: met)" if med <= GOAL_S else " (goal <= 0.3 s: MISSED)")
    print(f"\n[fp8norm bench] {label}: median {med:.3f} s, min {best:.3f} s over {ROUNDS} runs; "
          f"{med - base:+.3f} s over the bare interpreter{goal}")
