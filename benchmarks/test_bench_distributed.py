"""Wall time of `fp8norm quantize` with 1 and 2 torchrun ranks on the same checkpoint, and each
rank's peak RSS (CPU here: 2 cores; on a GPU node each rank uses its own GPU).

    python -m pytest benchmarks/test_bench_distributed.py --benchmark-only -s
    FP8NORM_BENCH_GB=4 FP8NORM_BENCH_RANKS=1,2,4,8 python -m pytest benchmarks/test_bench_distributed.py ...
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

SIZE_GB = float(os.environ.get("FP8NORM_BENCH_GB", "0.4"))
RANKS = [int(r) for r in os.environ.get("FP8NORM_BENCH_RANKS", "1,2").split(",")]
SHARD = os.environ.get("FP8NORM_BENCH_SHARD", "32MB")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-src")
    shape = (2048, 2048)
    n = max(2, int(SIZE_GB * 1e9 // (shape[0] * shape[1] * 2)))
    per_file = 16
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for f in range(0, n, per_file):
        fname = f"model-{f // per_file + 1:05d}-of-{-(-n // per_file):05d}.safetensors"
        tensors = {f"model.layers.{i}.mlp.down_proj.weight": torch.randn(shape, generator=g).bfloat16()
                   for i in range(f, min(n, f + per_file))}
        weight_map.update({k: fname for k in tensors})
        save_file(tensors, str(root / fname))
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text("{}")
    return root


def _run(ranks, src, dst):
    env = dict(os.environ, FP8NORM_REPORT_PEAK_RSS="1")
    args = ["quantize", str(src), str(dst), "--max-shard-size", SHARD, "-q", "--skip-verify", "--overwrite"]
    cmd = ([sys.executable, "-m", "fp8norm", *args] if ranks == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m",
            "fp8norm", *args])
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr[-2000:]
    rss = [int(m) for m in re.findall(r"peak RSS rank \d+: (\d+) MiB", res.stderr)]
    return wall, rss


def test_scaling_with_ranks(source, tmp_path, benchmark, capsys):
    size = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    rows = []

    def run_all():
        rows.clear()
        for r in RANKS:
            rows.append((r, *_run(r, source, tmp_path / f"o{r}")))

    benchmark.pedantic(run_all, rounds=1, iterations=1)
    base = rows[0][1]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    with capsys.disabled():
        print(f"\n\nfp8norm quantize, {size / 1e9:.2f} GB bf16, shards {SHARD}, on {device}")
        for r, wall, rss in rows:
            print(f"  {r} rank(s): {wall:6.2f} s wall (incl. start-up)  {size / wall / 1e9:5.2f} GB/s  "
                  f"speed-up {base / wall:4.2f}x  peak RSS per rank {', '.join(f'{m} MiB' for m in rss)}")
