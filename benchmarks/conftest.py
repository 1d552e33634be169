"""Shared machinery of the fp8norm benchmarks: cases, backends, timing, and the summary table.

Run:  python -m pytest benchmarks/ --benchmark-only        (see benchmarks/README.md)

Everything the benchmark modules need lives here, behind fixtures (`harness`) and the
`pytest_generate_tests` hook (cases x backends), because pyproject's `--import-mode=importlib` keeps
this folder off sys.path: a helper module here could not be imported by the test files.

Backends (one benchmark each, all on the same input, in the same session):
  triton         fp8norm.kernels (CUDA only; on CPU it would run in the Triton interpreter)
  twin           fp8norm.reference, the chunked eager-torch twin
  naive          whole-tensor eager torch, DeepGEMM's `per_block_cast_to_fp8` formula (see below)
  compile-twin   torch.compile(twin); skipped with a note where it fails or would unroll too much
  compile-naive  torch.compile(naive)
  copy           `dst.copy_(src)` moving the same number of bytes (read + written) as the op

Each call is timed on its own, synchronized on CUDA: a whole public call (checks, allocation, launch,
the NaN/Inf host sync), which for a ~40 us kernel is tens of microseconds more than the kernel. The
kernels alone (CUDA-graph replay of back-to-back launches) are measured by tools/gpu_check.sh.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from collections.abc import Callable

import pytest
import torch

import fp8norm
from fp8norm import reference

BLOCK = 128
E4M3_MAX = 448.0
DTYPE = torch.bfloat16
OPS = ("quant", "dequant")

# (label, full shape): weight shapes ([out, in]) of real models, bf16.
FULL_CASES = [
    ("4096x14336", (4096, 14336)),                  # Llama-3-8B MLP down_proj
    ("7168x18432", (7168, 18432)),                  # DeepSeek-V3 dense MLP down_proj
    ("18432x7168", (18432, 7168)),                  # DeepSeek-V3 dense MLP gate/up_proj
    ("experts-128x1536x2048", (128, 1536, 2048)),   # Qwen3-30B-A3B experts, fused gate_up
    ("experts-256x4096x7168", (256, 4096, 7168)),   # DeepSeek-V3 experts, fused gate_up
]
SPEEDUP_CASE = "18432x7168"  # the 7168-wide case the twin-vs-naive requirement is checked on

RESULTS_KEY = pytest.StashKey[dict]()
# Share of all CPUs that other processes may take during a measurement before it is flagged (and the
# speedup requirement not judged): the chunked twin syncs its OpenMP threads every op, so on a 2-core
# box it slows down far more than the single big ops of naive when a neighbour takes a core.
BUSY_FLAG = 0.05
BUSY_NO_JUDGE = 0.10


# --------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------

def pytest_addoption(parser):
    g = parser.getgroup("fp8norm benchmarks")
    g.addoption("--fp8-shapes", choices=("auto", "full", "small"), default="auto",
                help="auto: full shapes on CUDA, shrunk (~--fp8-target-mb each) on CPU")
    g.addoption("--fp8-target-mb", type=float, default=32.0,
                help="input size (MiB of bf16) a shrunk case aims at (default 32)")
    g.addoption("--fp8-budget", type=float, default=None,
                help="seconds of timed rounds per benchmark (default 1.0 on CPU, 0.5 on CUDA)")
    g.addoption("--fp8-no-compile", action="store_true", help="skip the torch.compile backends")
    g.addoption("--fp8-compile-max-chunks", type=int, default=200,
                help="skip compile-twin where dynamo would unroll more chunk iterations than this")
    g.addoption("--fp8-stat", choices=("auto", "median", "min"), default="auto",
                help="statistic behind GB/s and the ratios: auto = min on CPU (a shared, noisy box), "
                     "median on CUDA")
    g.addoption("--fp8-min-speedup", type=float, default=2.5,
                help="CPU requirement: the twin at least this many times faster than naive")


# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    label: str
    full_shape: tuple[int, ...]
    shape: tuple[int, ...]

    @property
    def shrunk(self) -> bool:
        return self.shape != self.full_shape

    def __str__(self) -> str:
        return self.label


def fmt_shape(shape) -> str:
    return "x".join(str(d) for d in shape)


def _round_rows(rows: float) -> int:
    return max(BLOCK, int(rows) // BLOCK * BLOCK)


def shrink(shape: tuple[int, ...], target_bytes: float) -> tuple[int, ...]:
    """Keep N (and M for experts where possible); cut M (2D) or E (3D) to about target_bytes."""
    esize = torch.finfo(DTYPE).bits // 8
    if len(shape) == 2:
        m, n = shape
        return (min(m, _round_rows(target_bytes / (n * esize))), n)
    e, m, n = shape
    per_expert = m * n * esize
    e2 = min(e, max(2, int(target_bytes // per_expert)))
    if e2 * per_expert > 2 * target_bytes:  # a single expert pair is already too big: cut M too
        m = min(m, _round_rows(target_bytes / (e2 * n * esize)))
    return (e2, m, n)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cases_for(config) -> list[Case]:
    mode = config.getoption("--fp8-shapes")
    small = mode == "small" or (mode == "auto" and device().type == "cpu")
    target = config.getoption("--fp8-target-mb") * 2**20
    return [Case(lbl, full, shrink(full, target) if small else full) for lbl, full in FULL_CASES]


def backends_for(config, compiled: bool) -> list[str]:
    """Eager backends, or (for the `*_compiled` tests, which run last) the torch.compile ones."""
    if compiled:
        return [] if config.getoption("--fp8-no-compile") else ["compile-twin", "compile-naive"]
    return (["triton"] if device().type == "cuda" else []) + ["twin", "naive"]


def pytest_generate_tests(metafunc):
    names = metafunc.fixturenames
    if "harness" not in names:  # other suites in benchmarks/ keep their own parameters
        return
    cases = cases_for(metafunc.config)
    if "case" in names and "backend" in names:
        compiled = metafunc.function.__name__.endswith("_compiled")
        params = [(c, b) for c in cases for b in backends_for(metafunc.config, compiled)]
        metafunc.parametrize(("case", "backend"), params, ids=[f"{c}-{b}" for c, b in params])
    elif "case" in names:
        metafunc.parametrize("case", cases, ids=[c.label for c in cases])
    if "op" in names:
        metafunc.parametrize("op", OPS)


# --------------------------------------------------------------------------------------------------
# Naive whole-tensor implementations (the baseline the twin must beat on CPU)
# --------------------------------------------------------------------------------------------------

def _align(v: int, a: int = BLOCK) -> int:
    return -(-v // a) * a


def naive_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepGEMM's `per_block_cast_to_fp8` (plus a saturating clamp), for [M, N] or [E, M, N].

    Pads the whole tensor to multiples of 128, views it as [.., M/128, 128, N/128, 128], and works
    on full-size fp32 temporaries: what one writes without thinking about memory traffic.
    """
    *lead, m, n = x.shape
    xp = torch.zeros((*lead, _align(m), _align(n)), dtype=x.dtype, device=x.device)
    xp[..., :m, :n] = x
    xv = xp.view(*lead, xp.size(-2) // BLOCK, BLOCK, xp.size(-1) // BLOCK, BLOCK)
    d = len(lead)
    amax = xv.abs().float().amax(dim=(d + 1, d + 3), keepdim=True).clamp(1e-4)
    sf = amax / E4M3_MAX
    q = (xv * (1.0 / sf)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view_as(xp)[..., :m, :n].contiguous(), sf.view(*lead, xv.size(d), xv.size(d + 2))


def naive_dequant(q: torch.Tensor, scale_inv: torch.Tensor, out_dtype=DTYPE) -> torch.Tensor:
    """Whole-tensor `q * scale_inv` with the scales expanded to full size (repeat_interleave)."""
    m, n = q.shape[-2:]
    sf = scale_inv.float().repeat_interleave(BLOCK, -2).repeat_interleave(BLOCK, -1)[..., :m, :n]
    return (q.float() * sf).to(out_dtype)


# --------------------------------------------------------------------------------------------------
# CPU contention monitor
# --------------------------------------------------------------------------------------------------

class CpuMonitor:
    """Share of the machine's CPU time that other processes used during a window (Linux /proc).

    busy jiffies of /proc/stat minus those of this process and its descendants (inductor's compile
    workers included). Anything unreadable (not Linux) disables it: `foreign` then returns None.
    """

    def __init__(self):
        try:
            self.tick = os.sysconf("SC_CLK_TCK")
            self.ncpu = os.cpu_count() or 1
            self.ok = self._busy() is not None
        except (OSError, ValueError, AttributeError):
            self.ok = False

    @staticmethod
    def _busy() -> int | None:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal: all but idle and iowait
        return v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)

    @staticmethod
    def _own() -> int:
        me, parent, jiffies = os.getpid(), {}, {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as f:
                    st = f.read()
            except OSError:
                continue
            rest = st[st.rfind(")") + 2:].split()
            parent[int(name)] = int(rest[1])
            jiffies[int(name)] = sum(int(t) for t in rest[11:15])  # utime stime cutime cstime
        total = 0
        for pid, j in jiffies.items():
            p, hops = pid, 0
            while p not in (me, 0, 1) and hops < 64:
                p, hops = parent.get(p, 0), hops + 1
            if p == me:
                total += j
        return total

    def snapshot(self):
        if not self.ok:
            return None
        try:
            return time.monotonic(), self._busy(), self._own()
        except (OSError, ValueError, IndexError):
            return None

    def foreign(self, start) -> float | None:
        end = self.snapshot()
        if start is None or end is None or end[0] - start[0] < 0.05:
            return None
        other = (end[1] - start[1]) - (end[2] - start[2])
        return max(0.0, other / self.tick / ((end[0] - start[0]) * self.ncpu))


# --------------------------------------------------------------------------------------------------
# Harness
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
    op: str
    case: Case
    backend: str
    ms_median: float
    ms_min: float
    rounds: int
    nbytes: int          # bytes read + written
    exact: bool | None = None  # bit-identical to the reference backend's output (None: not checked)
    stat: str = "median"  # which of the two `ms` (hence GB/s and every ratio) reports
    others: float | None = None  # share of all CPUs other processes used meanwhile (CPU only)

    @property
    def ms(self) -> float:
        return self.ms_min if self.stat == "min" else self.ms_median

    @property
    def gbps(self) -> float:
        return self.nbytes / (self.ms * 1e-3) / 1e9


def quant_bytes(shape, in_dtype=DTYPE) -> int:
    """x read + q written (1 byte an element) + fp32 scales written."""
    s_numel = math.prod(fp8norm.kernels.numerics.fp8_block.scale_inv_shape(tuple(shape), (BLOCK, BLOCK)))
    numel = math.prod(shape)
    return numel * (torch.finfo(in_dtype).bits // 8) + numel * 1 + s_numel * 4


def dequant_bytes(shape, out_dtype=DTYPE) -> int:
    """q read (1 byte an element) + fp32 scales read + out written."""
    s_numel = math.prod(fp8norm.kernels.numerics.fp8_block.scale_inv_shape(tuple(shape), (BLOCK, BLOCK)))
    numel = math.prod(shape)
    return numel * 1 + s_numel * 4 + numel * (torch.finfo(out_dtype).bits // 8)


def _same(a, b) -> bool:
    if isinstance(a, tuple):
        return all(_same(u, v) for u, v in zip(a, b))
    if a.shape != b.shape:
        return False
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return a.dtype == b.dtype and bool(torch.equal(a, b))


class Harness:
    def __init__(self, config):
        self.config = config
        self.device = device()
        self.cuda = self.device.type == "cuda"
        budget = config.getoption("--fp8-budget")
        self.budget = budget if budget is not None else (0.5 if self.cuda else 1.0)
        self.max_rounds = 200 if self.cuda else 50
        self.min_rounds = 5 if self.cuda else 3
        stat = config.getoption("--fp8-stat")
        self.stat = stat if stat != "auto" else ("median" if self.cuda else "min")
        self.results: list[Result] = []
        self.notes: list[str] = []
        self.speedups: list[tuple[str, Case, float, float, float, float]] = []
        self._inputs: tuple[Case, dict] | None = None
        self._compiled: dict[str, Callable] = {}
        self._compile_failed: dict[str, str] = {}
        self._announced: set[str] = set()
        self.monitor = None if self.cuda else CpuMonitor()
        self.last_others: float | None = None
        if self.cuda:
            import fp8norm.kernels  # noqa: F401  (imports triton, which the CPU backends do not need)
        for name in ("recompile_limit", "cache_size_limit"):  # one compile per shape, dynamic=False
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 64)

    # -- inputs ------------------------------------------------------------------------------------

    def inputs(self, case: Case) -> dict:
        """x, and lazily the reference outputs, for one case (only the latest case is kept)."""
        if self._inputs is not None and self._inputs[0] == case:
            data = self._inputs[1]
            if "x" not in data:  # dropped to make room (dequant); the same seed gives the same x
                data["x"] = self._make_x(case)
            return data
        self._inputs = None
        self._free()
        x = self._make_x(case)
        data = {"x": x}
        self._inputs = (case, data)
        if case.label not in self._announced:
            self._announced.add(case.label)
            used = fmt_shape(case.shape) + (f" (shrunk from {fmt_shape(case.full_shape)})" if case.shrunk else "")
            print(f"\n[fp8norm bench] case {case.label}: shape {used}, {x.numel() * x.element_size() / 2**20:.1f} MiB bf16")
        return data

    def _make_x(self, case: Case) -> torch.Tensor:
        gen = torch.Generator(device=self.device).manual_seed(0)
        return torch.randn(case.shape, generator=gen, dtype=DTYPE, device=self.device)

    def reference_out(self, op: str, case: Case):
        data = self.inputs(case)
        if "quant_ref" not in data:
            data["quant_ref"] = self.impl("quant", self.ref_backend)(data["x"])
        if op == "quant":
            return data["quant_ref"]
        if self.cuda:
            data.pop("x", None)  # dequant does not need x: 15 GB back for the biggest case
        if "dequant_ref" not in data:
            data["dequant_ref"] = self.impl("dequant", self.ref_backend)(*data["quant_ref"])
        return data["dequant_ref"]

    @property
    def ref_backend(self) -> str:
        return "triton" if self.cuda else "twin"

    def _free(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    # -- implementations ---------------------------------------------------------------------------

    def impl(self, op: str, backend: str) -> Callable:
        if backend == "triton":
            import fp8norm.kernels as k
            return k.quant_fp8_block if op == "quant" else k.dequant_fp8_block
        if backend == "twin":
            return reference.quant_fp8_block if op == "quant" else reference.dequant_fp8_block
        if backend == "naive":
            return naive_quant if op == "quant" else naive_dequant
        if backend in ("compile-twin", "compile-naive"):
            key = f"{op}:{backend}"
            if key not in self._compiled:
                base = self.impl(op, backend.removeprefix("compile-"))
                self._compiled[key] = torch.compile(base, dynamic=False)
            return self._compiled[key]
        raise ValueError(backend)

    def twin_chunk_iterations(self, shape) -> int:
        """How many chunk-loop iterations dynamo unrolls when it traces the twin."""
        *lead, m, n = shape
        k = max(1, getattr(reference, "CHUNK_ELEMS", 1 << 20) // (BLOCK * n))  # row blocks a chunk
        return math.prod(lead) * math.ceil(math.ceil(m / BLOCK) / k)

    # -- timing ------------------------------------------------------------------------------------

    def _timed(self, fn: Callable, args) -> tuple[Callable, list[float]]:
        times: list[float] = []
        sync = torch.cuda.synchronize if self.cuda else (lambda: None)

        def run():
            t0 = time.perf_counter()
            out = fn(*args)
            sync()
            times.append(time.perf_counter() - t0)
            return out

        return run, times

    def _rounds(self, seconds_per_call: float) -> int:
        n = int(self.budget / max(seconds_per_call, 1e-6))
        return max(self.min_rounds, min(self.max_rounds, n))

    def measure(self, benchmark, fn: Callable, args, group: str, check: Callable | None = None):
        """First call (compile / warm-up; `check(output)` then drops it), then pedantic timed rounds.

        Returns (check's result, median s, min s, rounds). Timing is taken around each call
        (synchronized on CUDA), so it also works under --benchmark-disable (one round).
        `self.last_others` gets the share of the CPUs other processes took during the timed rounds.
        """
        run, times = self._timed(fn, args)
        first = run()
        checked = check(first) if check is not None else None
        del first  # not kept alive through the rounds (GPU memory)
        rounds = self._rounds(times[-1] if len(times) else 1.0)
        times.clear()
        benchmark.group = group
        snap = self.monitor.snapshot() if self.monitor else None
        benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
        self.last_others = self.monitor.foreign(snap) if self.monitor else None
        times = times[1:] if len(times) > rounds else times  # drop the pedantic warm-up round
        return checked, statistics.median(times), min(times), len(times)

    # -- benchmarks --------------------------------------------------------------------------------

    def bench(self, op: str, case: Case, backend: str, benchmark):
        if backend == "compile-twin":
            key = f"{op}:compile-twin"
            if key in self._compile_failed:
                pytest.skip(self._compile_failed[key])
            iters = self.twin_chunk_iterations(case.shape)
            limit = self.config.getoption("--fp8-compile-max-chunks")
            if iters > limit:
                msg = (f"compile-twin {op} {case}: dynamo would unroll {iters} chunk iterations "
                       f"(> --fp8-compile-max-chunks={limit}); see compile-naive instead")
                self.notes.append(msg)
                pytest.skip(msg)
        data = self.inputs(case)
        if op == "quant":
            args, nbytes = (data["x"],), quant_bytes(case.shape)
        else:
            args, nbytes = tuple(self.reference_out("quant", case)), dequant_bytes(case.shape)
        fn = self.impl(op, backend)

        def check(out) -> bool:  # bit-identical to the reference backend's output
            return True if backend == self.ref_backend else _same(out, self.reference_out(op, case))

        msg = None
        try:
            exact, med, mn, rounds = self.measure(benchmark, fn, args, group=f"{op} {case}", check=check)
        except torch.OutOfMemoryError:
            msg = f"{backend} {op} {case}: out of memory at shape {fmt_shape(case.shape)}"
        except Exception as e:  # noqa: BLE001 - a compile backend that cannot build is a note, not an error
            if not backend.startswith("compile"):
                raise
            msg = (f"{backend} {op} failed on {case} ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                   f"not retried this session; the x compile column uses compile-naive")
            if backend == "compile-twin":
                self._compile_failed[f"{op}:compile-twin"] = msg
        if msg is not None:  # outside `except`: the traceback no longer pins the failed call's tensors
            self._free()
            self.notes.append(msg)
            pytest.skip(msg)
        res = Result(op, case, backend, med * 1e3, mn * 1e3, rounds, nbytes, exact, self.stat, self.last_others)
        self.results.append(res)
        benchmark.extra_info.update(shape=fmt_shape(case.shape), gbps=round(res.gbps, 2), exact=exact)
        print(f"[fp8norm bench] {op} {case} {backend}: median {res.ms_median:.3f} ms, min {res.ms_min:.3f} ms, "
              f"{res.gbps:.1f} GB/s ({self.stat}), "
              f"{'bit-exact' if exact else 'DIFFERS from ' + self.ref_backend}")
        self._free()

    def bench_copy(self, case: Case, benchmark):
        """`dst.copy_(src)` moving as many bytes (read + written) as quant does for this case."""
        if self._inputs is not None:  # copy buffers need the room on big GPUs
            self._inputs = None
            self._free()
        half = quant_bytes(case.shape) // 2
        src = torch.ones(half, dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        _, med, mn, rounds = self.measure(benchmark, dst.copy_, (src,), group=f"copy {case}")
        del src, dst
        self.results.append(Result("copy", case, "copy", med * 1e3, mn * 1e3, rounds, 2 * half, None, self.stat,
                                   self.last_others))
        self._free()

    def speedup(self, op: str, benchmark):
        """The twin vs naive, timed back to back on SPEEDUP_CASE (the CPU requirement)."""
        case = next(c for c in cases_for(self.config) if c.label == SPEEDUP_CASE)
        data = self.inputs(case)
        args = (data["x"],) if op == "quant" else tuple(self.reference_out("quant", case))
        twin, twin_times = self._timed(self.impl(op, "twin"), args)
        naive, naive_times = self._timed(self.impl(op, "naive"), args)
        twin(), naive()  # warm-up, and the time one pair takes
        rounds = self._rounds(twin_times[-1] + naive_times[-1])
        twin_times.clear()
        naive_times.clear()
        # Interleaved: pedantic's untimed `setup` runs (and times) naive before each timed twin round,
        # so a slow phase of the machine falls on both (it still hurts the twin more: see BUSY_FLAG).
        benchmark.group = f"speedup {op}"
        snap = self.monitor.snapshot() if self.monitor else None
        benchmark.pedantic(twin, setup=lambda: (naive(), None)[1], rounds=rounds, iterations=1)
        others = self.monitor.foreign(snap) if self.monitor else None
        if not naive_times:  # --benchmark-disable: pedantic ran twin once, without setup
            naive()
        t_med, n_med = statistics.median(twin_times), statistics.median(naive_times)
        ratio, ratio_min = n_med / t_med, min(naive_times) / min(twin_times)
        busy = others is not None and others >= BUSY_NO_JUDGE
        self.speedups.append((op, case, t_med * 1e3, n_med * 1e3, ratio, ratio_min, others))
        print(f"[fp8norm bench] speedup {op} {case} ({fmt_shape(case.shape)}): twin {t_med * 1e3:.2f} ms, "
              f"naive {n_med * 1e3:.2f} ms -> {ratio:.2f}x (min/min {ratio_min:.2f}x)"
              + (f", other processes took {100 * others:.0f}% of the CPUs" if others is not None else ""))
        return {"ratio": ratio, "ratio_min": ratio_min, "others": others, "busy": busy}


@pytest.fixture(scope="session")
def harness(request) -> Harness:
    h = Harness(request.config)
    request.config.stash[RESULTS_KEY] = {"harness": h}
    return h


# --------------------------------------------------------------------------------------------------
# Summary table
# --------------------------------------------------------------------------------------------------

def _ratio(ref: Result | None, r: Result) -> str:
    return f"{ref.ms / r.ms:.2f}" if ref is not None else "-"


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    stash = config.stash.get(RESULTS_KEY, None)
    if not stash:
        return
    h: Harness = stash["harness"]
    if not h.results and not h.speedups:
        return
    tr = terminalreporter
    dev = torch.cuda.get_device_name() if h.cuda else f"cpu, {torch.get_num_threads()} threads"
    tr.write_sep("=", "fp8norm benchmark summary")
    tr.write_line(f"device: {dev}; torch {torch.__version__}; input bf16, block 128x128, fp32 scales")
    tr.write_line(f"median / min over the timed rounds; GB/s and every ratio use the {h.stat} (--fp8-stat); "
                  "GB/s = (bytes read + written) / time")
    tr.write_line("x N = how many times faster than backend N (its time / this time); "
                  "% copy = GB/s / the copy baseline's GB/s")
    tr.write_line("x compile = vs compile-twin, or compile-naive where compile-twin did not run; "
                  "exact = bit-identical to " + h.ref_backend)
    if not h.cuda:
        tr.write_line(f"busy = share of the CPUs other processes took during the timed rounds, shown when "
                      f">= {100 * BUSY_FLAG:.0f}% (then the row's numbers are suspect)")
    by_key: dict[tuple[str, str, str], Result] = {(r.op, r.case.label, r.backend): r for r in h.results}
    if any(r.op != "copy" for r in h.results):
        _write_table(tr, config, by_key, h.stat)
    _write_rest(tr, config, h, by_key)


def _write_table(tr, config, by_key, stat):
    header = (f"{'op':<8}{'case':<23}{'shape used':<17}{'backend':<14}{'median ms':>10}{'min ms':>10}{'GB/s':>8}"
              f"{'x naive':>9}{'x eager':>9}{'x compile':>10}{'% copy':>8}  exact  busy")
    tr.write_line("")
    tr.write_line(header)
    tr.write_line("-" * len(header))
    order = ["triton", "twin", "naive", "compile-twin", "compile-naive"]
    for op in OPS:
        for case in cases_for(config):
            rows = [by_key[(op, case.label, b)] for b in order if (op, case.label, b) in by_key]
            if not rows:
                continue
            naive = by_key.get((op, case.label, "naive"))
            eager = by_key.get((op, case.label, "twin"))
            comp = by_key.get((op, case.label, "compile-twin")) or by_key.get((op, case.label, "compile-naive"))
            copy = by_key.get(("copy", case.label, "copy"))
            for r in rows:
                pct = f"{100 * r.gbps / copy.gbps:.0f}%" if copy is not None else "-"
                exact = {True: "yes", False: "NO", None: "-"}[r.exact]
                busy = f"{100 * r.others:.0f}%" if r.others is not None and r.others >= BUSY_FLAG else ""
                tr.write_line(
                    f"{op:<8}{case.label:<23}{fmt_shape(case.shape):<17}{r.backend:<14}{r.ms_median:>10.3f}"
                    f"{r.ms_min:>10.3f}{r.gbps:>8.1f}{_ratio(naive, r):>9}{_ratio(eager, r):>9}{_ratio(comp, r):>10}"
                    f"{pct:>8}  {exact:<5}  {busy}".rstrip())


def _write_rest(tr, config, h: Harness, by_key):
    copies = [r for r in h.results if r.op == "copy"]
    if copies:
        tr.write_line("")
        tr.write_line("copy baseline (dst.copy_(src), same bytes read + written as quant):")
        for r in copies:
            busy = f"  busy {100 * r.others:.0f}%" if r.others is not None and r.others >= BUSY_FLAG else ""
            tr.write_line(f"  {r.case.label:<23}{fmt_shape(r.case.shape):<17}median {r.ms_median:8.3f} ms  "
                          f"min {r.ms_min:8.3f} ms{r.gbps:>8.1f} GB/s{busy}")
    if h.cuda:
        tr.write_line("")
        tr.write_line("targets (triton): >= 90% of copy bandwidth and >= 5x eager torch twin")
        for op in OPS:
            for case in cases_for(config):
                t = by_key.get((op, case.label, "triton"))
                eager = by_key.get((op, case.label, "twin"))
                copy = by_key.get(("copy", case.label, "copy"))
                if t is None:
                    continue
                pct = 100 * t.gbps / copy.gbps if copy else float("nan")
                xe = eager.ms / t.ms if eager else float("nan")
                ok = pct >= 90 and xe >= 5
                tr.write_line(f"  {op:<8}{case.label:<23}{pct:6.1f}% of copy, {xe:6.2f}x eager  "
                              f"{'met' if ok else 'MISSED'}")
    if h.speedups:
        req = config.getoption("--fp8-min-speedup")
        tr.write_line("")
        tr.write_line(f"twin vs naive, rounds interleaved (CPU requirement: twin >= {req}x faster than naive):")
        for op, case, twin_ms, naive_ms, ratio, ratio_min, others in h.speedups:
            ok = max(ratio, ratio_min) >= req
            verdict = ("ok" if ok else "BELOW REQUIREMENT") if not h.cuda else "(not required on CUDA)"
            if not h.cuda and others is not None and others >= BUSY_NO_JUDGE:
                verdict = f"NOT JUDGED: other processes took {100 * others:.0f}% of the CPUs"
            tr.write_line(f"  {op:<8}{case.label} {fmt_shape(case.shape):<11} twin {twin_ms:8.2f} ms  "
                          f"naive {naive_ms:8.2f} ms  -> {ratio:5.2f}x (min/min {ratio_min:5.2f}x)  {verdict}")
    shrunk = [c for c in cases_for(config) if c.shrunk]
    if shrunk:
        tr.write_line("")
        tr.write_line("shapes shrunk for CPU (N kept; M or E cut; --fp8-shapes full for the real ones): "
                      + ", ".join(f"{fmt_shape(c.full_shape)} -> {fmt_shape(c.shape)}" for c in shrunk))
    busy = [r.others for r in h.results if r.others is not None and r.others >= BUSY_FLAG]
    busy += [sp[-1] for sp in h.speedups if sp[-1] is not None and sp[-1] >= BUSY_FLAG]
    if busy:
        tr.write_line("")
        tr.write_line(f"WARNING: other processes used the CPUs during {len(busy)} measurement(s) (up to "
                      f"{100 * max(busy):.0f}% of the machine): those rows are suspect, the twin most of all; "
                      f"rerun on an idle machine")
    if h.notes:
        tr.write_line("")
        tr.write_line("notes:")
        for n in h.notes:
            tr.write_line(f"  - {n}")
