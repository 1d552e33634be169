"""The output engine against the disk: `repack`, `quantize` and `convert` vs `cp -r` + `sync` of the
same source bytes, per stage, in one run; optionally the same commands from another checkout (the
code before a change) interleaved with them, so a before/after table comes from one run.

    python -m pytest benchmarks/test_bench_engine.py --benchmark-only -s
    FP8NORM_BENCH_BASELINE=/path/to/old/checkout python -m pytest benchmarks/test_bench_engine.py ... -s

Env: FP8NORM_BENCH_GB (size of the bf16 Llama-shaped source, tools/gpu_check.py's; default 1.5),
FP8NORM_BENCH_ROUNDS (default 3; the min of the rounds is shown), FP8NORM_BENCH_BASELINE (a checkout
whose `fp8norm` package is run as "before", with PYTHONPATH pointing at it),
FP8NORM_BENCH_LLMCOMPRESSOR (a python with llmcompressor: its `model_free_ptq` FP8_BLOCK on the same
source, in the quantize rounds), FP8NORM_BENCH_BUSY=1 (a process spins on one core during the
rounds). The source is written once and read from the page cache by every run (as `cp` reads it).
`cp` is followed by `sync FILE...` of what it wrote (fp8norm fsyncs each file it writes). Stages
come from the command's own `time` and `stages` lines (an older fp8norm prints no `stages` line:
"-"); `start-up` is the process's wall time less the engine's, i.e. imports, planning and closing;
`first read` the time from launch to the first tensor read. Peak RSS of the whole process. Timings
on a shared machine are noisy: compare the ratios, measured in the same round.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

SIZE_GB = float(os.environ.get("FP8NORM_BENCH_GB", "1.5"))
ROUNDS = int(os.environ.get("FP8NORM_BENCH_ROUNDS", "3"))
BASELINE = os.environ.get("FP8NORM_BENCH_BASELINE")
LLMCOMPRESSOR = os.environ.get("FP8NORM_BENCH_LLMCOMPRESSOR")  # a python with llmcompressor installed
BUSY = os.environ.get("FP8NORM_BENCH_BUSY") == "1"
MODEL_FREE_PTQ = ("import sys; from llmcompressor.entrypoints.model_free import model_free_ptq; "
                  "model_free_ptq(sys.argv[1], sys.argv[2], scheme='FP8_BLOCK', ignore=['lm_head'], device='cpu')")
REPO = Path(__file__).resolve().parents[1]
STAGES = ("read", "hash", "compute", "write", "fsync", "verify", "start-up", "first read")


def _gpu_check():
    """tools/gpu_check.py, whose step (c) quantizes the same synthetic Llama on a GPU node."""
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-engine")
    bf16, fp8 = root / "llama-bf16", root / "llama-fp8"
    _gpu_check().write_synthetic_llama(bf16, SIZE_GB * 1e9, "cpu")  # hidden 4096, MLP 14336, a shard per layer
    subprocess.run([sys.executable, "-m", "fp8norm", "quantize", str(bf16), str(fp8), "-q", "--verify-samples", "0"],
                   check=True, stdout=subprocess.DEVNULL)
    # Each checkout's bytecode compiled once, as an installed package's is: under PYTHONDONTWRITEBYTECODE
    # (set on some machines) every run would compile the package anew, ~50 ms of each start.
    for checkout in filter(None, (REPO, BASELINE)):
        subprocess.run([sys.executable, "-m", "compileall", "-q", *(str(Path(checkout) / p) for p in ("fp8norm", "kernels"))],
                       check=True, stdout=subprocess.DEVNULL)
    return {"bf16": bf16, "fp8": fp8}


def _source_bytes(src: Path) -> int:
    return sum(p.stat().st_size for p in src.iterdir() if p.is_file())


def _run(cmd: list[str], env=None) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (bytes) and stdout of one child process. The peak comes from GNU time:
    a child forked from this (large) pytest process would report pytest's resident pages as its own."""
    peak = Path(os.environ.get("TMPDIR", "/tmp")) / f"fp8norm-bench-rss-{os.getpid()}"
    t0 = time.perf_counter()
    # cwd: not the checkout, whose fp8norm/ `python -m` would import ahead of PYTHONPATH's
    out = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(peak), *cmd], stdout=subprocess.PIPE, env=env,
                         text=True, check=True, cwd=peak.parent).stdout
    wall = time.perf_counter() - t0
    rss = int(peak.read_text().split()[-1]) * 1024
    peak.unlink()
    return wall, rss, out


def cp_sync(src: Path, dst: Path) -> float:
    shutil.rmtree(dst, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    subprocess.run(["sync", *map(str, sorted(dst.rglob("*")))], check=True)
    return time.perf_counter() - t0


def parse_stages(out: str, wall: float) -> dict[str, float]:
    """The stage seconds a run printed (see the module doc)."""
    t = re.search(r"time\s+([\d.]+) s wall: read ([\d.]+) s, compute ([\d.]+) s .*?, write ([\d.]+) s", out)
    stages = {"engine": float(t.group(1)), "read": float(t.group(2)), "compute": float(t.group(3)),
              "write": float(t.group(4)), "start-up": wall - float(t.group(1))}
    s = re.search(r"stages\s+(.*)", out)
    if s:
        for name, secs in re.findall(r"([a-z -]+?) ([\d.]+) s", s.group(1)):
            stages[name.strip(" ,")] = float(secs)
    return stages


COMMANDS = {  # name: (source, fp8norm arguments after SRC DST)
    "repack": ("fp8", ["repack"]),
    "quantize": ("bf16", ["quantize"]),
    "convert": ("fp8", ["convert", "--to", "bf16"]),
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_engine_vs_cp(command, sources, tmp_path, benchmark, capsys):
    which, args = COMMANDS[command]
    src = sources[which]
    verb, *rest = args
    fp8norm = [sys.executable, "-m", "fp8norm", verb, str(src), "{dst}", *rest, "--overwrite", "-q"]
    versions = {"after": (fp8norm, dict(os.environ))}
    if BASELINE:
        versions["before"] = (fp8norm, {**os.environ, "PYTHONPATH": BASELINE})
    if LLMCOMPRESSOR and command == "quantize":
        versions["llm-compressor"] = ([LLMCOMPRESSOR, "-c", MODEL_FREE_PTQ, str(src), "{dst}"], dict(os.environ))
    results: dict[str, list] = {v: [] for v in versions}
    cps: list[float] = []

    def one_round():
        cps.append(cp_sync(src, tmp_path / "cp"))
        for version, (cmd, env) in versions.items():
            dst = tmp_path / version
            shutil.rmtree(dst, ignore_errors=True)
            wall, rss, out = _run([a.format(dst=dst) for a in cmd], env=env)
            results[version].append((wall, rss, parse_stages(out, wall) if "fp8norm" in cmd else {}))

    # one core kept busy by another process, the whole time, where asked
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if BUSY else None
    try:
        benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=0, iterations=1)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    cp_s = min(cps)
    nbytes = _source_bytes(src)
    with capsys.disabled():
        print(f"\n\n{command}: {nbytes / 1e9:.2f} GB ({which}) vs cp -r + sync of it, min of {ROUNDS} rounds; "
              f"{os.cpu_count()} CPUs{', one kept busy' if BUSY else ''}; noisy on a shared machine, compare the "
              "ratios")
        print(f"  {'':<15}{'wall s':>8}{'x cp':>7}{'peak MB':>9}  " + "".join(f"{s:>11}" for s in STAGES))
        print(f"  {'cp+sync':<15}{cp_s:>8.2f}{1:>7.2f}")
        after = min(r[0] for r in results["after"])
        for version, rs in results.items():
            wall, rss, stages = min(rs, key=lambda r: r[0])
            cells = "".join(f"{stages[s]:>11.2f}" if s in stages else f"{'-':>11}" for s in STAGES)
            vs = f"   after = {after / wall:.2f}x its time" if version != "after" else ""
            print(f"  {version:<15}{wall:>8.2f}{wall / cp_s:>7.2f}{max(r[1] for r in rs) / 1e6:>9.0f}  {cells}{vs}")
        print()
    benchmark.extra_info.update(cp_s=cp_s, bytes=nbytes, **{v: min(r[0] for r in rs) for v, rs in results.items()})
