#!/usr/bin/env python
"""The steps of tools/gpu_check.sh (one process per step, so a step that dies or times out loses
only itself). Every step adds its results to OUT/gpu_check.json as it goes (the file is rewritten
atomically after each record, so it is valid JSON at every moment) and refreshes OUT/gpu_check.txt.

    python tools/gpu_check.py STEP [--dry-run] [--out DIR]
    STEP: meta | correctness | bandwidth | compiled | checkpoint | summary | mark NAME STATUS

--dry-run runs the same code on the CPU with tiny shapes: the Triton kernels under the interpreter
against the torch twin, CPU wall-clock timings, torch.compile with the "eager" backend and a tiny
checkpoint, so the script is exercised by the test suite (tests/test_gpu_check.py) between GPU runs.

What is compared and timed is a registry (`OPS`): every public wrapper of fp8norm.kernels with a
twin of the same name in fp8norm.reference must be covered by one, or it is listed as uncovered.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

import fp8norm.kernels as fk
import fp8norm.reference as twin
from fp8norm.kernels.numerics import e2m1, int4, mx
from fp8norm.kernels.numerics import fp8_block as nx
from fp8norm.kernels.numerics import nvfp4 as n4
from fp8norm.output import atomic_write_text

E4M3 = torch.float8_e4m3fn
FULL_SHAPES = [(4096, 14336), (7168, 18432), (18432, 7168), (128, 1536, 2048), (256, 4096, 7168)]
DRY_SHAPES = [(128, 256), (2, 128, 128)]
# Eager torch and torch.compile materialize fp32 copies of the whole input: above this many input
# bytes they are skipped (the 256 x 4096 x 7168 experts are 15 GB in bf16).
EAGER_MAX_BYTES = 4 << 30
CHECKPOINT_GB = float(os.environ.get("FP8NORM_GPU_CHECK_GB", "8"))


# --------------------------------------------------------------------------------------------------
# The results file
# --------------------------------------------------------------------------------------------------

class Results:
    """OUT/gpu_check.json: {"meta", "steps", "correctness", "bandwidth", "wrapper_overhead",
    "torch_compile", "checkpoint", "uncovered"}; every change is written at once."""

    KEYS = ("meta", "steps", "correctness", "bandwidth", "wrapper_overhead", "torch_compile", "checkpoint",
            "uncovered", "compiled_kernels")

    def __init__(self, out: Path):
        self.path = out / "gpu_check.json"
        out.mkdir(parents=True, exist_ok=True)
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {}
        for k in self.KEYS:
            self.data.setdefault(k, {} if k in ("meta", "steps", "checkpoint") else [])

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=1))

    def add(self, key: str, record: dict) -> None:
        self.data[key].append(record)
        self.save()
        print(f"{key}: {json.dumps(record)}", flush=True)

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self.save()

    def step(self, name: str, status: str, **extra) -> None:
        self.data["steps"][name] = {"status": status, **extra}
        self.save()


# --------------------------------------------------------------------------------------------------
# The registry: what each op runs, on what input, and what it moves
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Op:
    """One operation: `fn` is the name of the wrapper in fp8norm.kernels and of its twin in
    fp8norm.reference; `make(shape, device, gen)` gives (args, kwargs); `eager` is a plain whole-tensor
    torch formula of the same op (for x eager / x torch.compile; None: not timed against one);
    `bytes(shape)` the bytes read + written."""

    name: str
    fn: str
    make: Callable
    bytes: Callable
    eager: Callable | None = None
    variants: tuple = ()  # extra (label, kwargs) for the correctness step
    host_sync: bool = False  # the wrapper syncs even with check_finite=False: no CUDA graph capture


def _mixed(shape, dtype, gen, device):
    """Normal values, rows scaled over ~1e-3..1e3, one all-zero tile, moved to `device`."""
    x = torch.randn(shape, generator=gen)
    x *= torch.exp(torch.empty(shape[:-1] + (1,)).uniform_(-7, 7, generator=gen))
    if shape[-2] > 128 and shape[-1] > 128:
        x[..., :128, :128] = 0
    return x.to(dtype).to(device)


def _random(shape, dtype, device):
    """Large inputs for timing, generated on the device (no NaN codes; no fp32 temporary)."""
    if dtype == E4M3:
        return torch.randint(0, 0x7E, shape, dtype=torch.uint8, device=device).view(E4M3)
    return torch.randn(shape, device=device, dtype=dtype) * 0.02


def _fp8_codes(shape, gen, device, nan_codes=False):
    codes = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    if not nan_codes:
        codes[(codes & 0x7F) == 0x7F] = 0x7E
    return codes.view(E4M3).to(device)


def _scales(shape, block, gen, device, dtype=torch.float32):
    s = torch.exp2(torch.randint(-14, -2, nx.scale_inv_shape(tuple(shape), block), generator=gen).float())
    return s.to(dtype).to(device)


def _nbytes(shape, dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


def eager_quant_ue8m0(x):
    """DeepGEMM's per_block_cast_to_fp8 with ue8m0 scales, whole tensor ([M, N], M, N % 128 == 0)."""
    m, n = x.shape
    t = x.float().view(m // 128, 128, n // 128, 128)
    sf = nx.ceil_to_ue8m0(t.abs().amax(dim=(1, 3), keepdim=True).clamp_min(1e-4) / 448.0)
    q = (t * (1.0 / sf)).clamp(-448.0, 448.0).to(E4M3)
    return q.view(m, n), sf.view(m // 128, n // 128)


def eager_dequant(q, s):
    m, n = q.shape
    return (q.float().view(m // 128, 128, n // 128, 128) * s.view(m // 128, 1, n // 128, 1)).to(torch.bfloat16
                                                                                                 ).view(m, n)


def eager_quant_nvfp4(x):
    m, n = x.shape
    g = x.float().view(m, n // 16, 16)
    s2 = g.abs().amax() / (6.0 * 448.0)
    s = (g.abs().amax(-1) / (6.0 * s2)).clamp(2.0 ** -9, 448.0).to(E4M3)
    q = g / (s.float() * s2).unsqueeze(-1)
    a = q.abs()
    code = sum((a >= b if up else a > b).to(torch.uint8) for b, up in zip(e2m1.E2M1_BOUNDS, e2m1.E2M1_TIE_UP))
    code = (code | ((q < 0).to(torch.uint8) << 3)).view(m, n)
    return code[:, 0::2] | (code[:, 1::2] << 4), s, s2


def eager_dequant_nvfp4(p, w, s2):
    m, half = p.shape
    codes = torch.stack([p & 0xF, p >> 4], -1).view(m, 2 * half).long()
    v = n4.e2m1_table(p.device)[codes].view(m, -1, 16)
    return (v * (w.float() * s2).unsqueeze(-1)).view(m, 2 * half).to(torch.bfloat16)


def _as_2d(t):
    return t.reshape(-1, t.shape[-1]) if t.dim() == 3 else t


def _make_quant(shape, device, gen, dtype=torch.bfloat16):
    x = _mixed(shape, dtype, gen, device) if gen is not None else _random(shape, dtype, device)
    return (x,), {"scale_fmt": "ue8m0"}


def _make_dequant(shape, device, gen):
    if gen is None:
        return (_random(shape, E4M3, device), torch.full(nx.scale_inv_shape(shape, (128, 128)), 2.0 ** -8,
                                                         device=device)), {}
    return (_fp8_codes(shape, gen, device, nan_codes=True), _scales(shape, (128, 128), gen, device)), {}


def _make_requant(shape, device, gen):
    (q, s), _ = _make_dequant(shape, device, gen)
    if gen is not None:  # no NaN codes: they raise (checked in the correctness step's NaN cases)
        q = _fp8_codes(shape, gen, device)
    return (q,), {"x_scale_inv": s, "scale_fmt": "ue8m0"}


def _make_nvfp4(shape, device, gen):
    x = _mixed(shape, torch.bfloat16, gen, device) if gen is not None else _random(shape, torch.bfloat16, device)
    return (x,), {}


def _make_dequant_nvfp4(shape, device, gen):
    *lead, m, n = shape
    if gen is None:
        p = torch.randint(0, 256, (*lead, m, n // 2), dtype=torch.uint8, device=device)
        w = torch.ones((*lead, m, n // 16), device=device).to(E4M3)
    else:
        p = torch.randint(0, 256, (*lead, m, n // 2), dtype=torch.uint8, generator=gen).to(device)
        w = torch.exp2(torch.randint(-9, 8, (*lead, m, n // 16), generator=gen).float()).to(E4M3)
        w.view(torch.uint8).view(-1)[0] = 0x7F  # a NaN scale code: its 16 outputs are NaN
        w = w.to(device)
    s2 = torch.full((lead[0],) if lead else (), 0.01, device=device)
    return (p, w, s2), {}



def _row_scaled_bf16(shape, gen) -> torch.Tensor:
    """bf16 normals, each row scaled by 2^k with k in [-12, 12) (rows of many scales)."""
    rows = torch.exp2(torch.randint(-12, 12, (*shape[:-1], 1), generator=gen).float())
    return (torch.randn(shape, generator=gen) * rows).to(torch.bfloat16)


def _numel(shape) -> int:
    return _nbytes(shape, torch.uint8)


def _make_quant_channel(shape, device, gen):
    if gen is None:  # timing: values do not matter
        return (torch.randn(shape, device=device, dtype=torch.bfloat16),), {}
    return (_row_scaled_bf16(shape, gen).to(device),), {}


def _make_dequant_channel(shape, device, gen):
    codes = _fp8_codes(shape, gen, device)
    scale = torch.rand((*shape[:-1], 1), generator=gen) + 1e-3
    return (codes, scale.to(device)), {}


def _whole(shape, group: int):
    """`shape` with its last dim rounded down to whole groups (at least one)."""
    return (*shape[:-1], max(group, shape[-1] // group * group))


def _make_quant_int4(shape, device, gen):
    return _make_quant_channel(_whole(shape, int4.GROUP_SIZE), device, gen)


def _make_dequant_int4(shape, device, gen):
    g = int4.GROUP_SIZE
    *lead, m, n = _whole(shape, g)
    words = torch.randint(-2 ** 31, 2 ** 31, (*lead, m, n // int4.PER_WORD), dtype=torch.int64, generator=gen)
    scale = torch.rand((*lead, m, n // g), generator=gen).to(torch.bfloat16)
    return (words.to(torch.int32).to(device), scale.to(device)), {}


def _int4_bytes(shape) -> int:
    n = _numel(_whole(shape, int4.GROUP_SIZE))
    return 2 * n + n // 2 + 2 * (n // int4.GROUP_SIZE)


def _make_quant_mx(fmt):
    def make(shape, device, gen):
        (x,), _ = _make_quant_channel(_whole(shape, mx.MX_BLOCK), device, gen)
        return (x,), {"fmt": fmt}
    return make


def _make_dequant_mx(fmt):
    def make(shape, device, gen):
        *lead, m, n = _whole(shape, mx.MX_BLOCK)
        if fmt == "mxfp8":
            codes = _fp8_codes((*lead, m, n), gen, device)
        else:  # packed E2M1 pairs: every byte is a value
            codes = torch.randint(0, 256, (*lead, m, n // 2), dtype=torch.uint8, generator=gen).to(device)
        scale = torch.randint(100, 150, (*lead, m, n // mx.MX_BLOCK), dtype=torch.uint8, generator=gen)
        return (codes, scale.to(device)), {"fmt": fmt}
    return make


def _mx_bytes(elem_bytes: float):
    def nbytes(shape):
        n = _numel(_whole(shape, mx.MX_BLOCK))
        return int(2 * n + elem_bytes * n + n // mx.MX_BLOCK)
    return nbytes


OPS = [
    Op("quant_fp8_block[bf16->e4m3,ue8m0]", "quant_fp8_block", _make_quant,
       lambda s: _nbytes(s, torch.bfloat16) + _nbytes(s, E4M3),
       eager=lambda x, **kw: eager_quant_ue8m0(_as_2d(x)),
       variants=tuple((f"{str(dt).split('.')[-1]},{fmt},{str(sd).split('.')[-1]}",
                       {"dtype": dt, "scale_fmt": fmt, "scale_dtype": sd})
                      for dt in (torch.bfloat16, torch.float16, torch.float32)
                      for fmt, sd in (("float", torch.float32), ("ue8m0", torch.float32),
                                      ("ue8m0", torch.float8_e8m0fnu), ("float", torch.bfloat16)))),
    Op("dequant_fp8_block[e4m3->bf16]", "dequant_fp8_block", _make_dequant,
       lambda s: _nbytes(s, E4M3) + _nbytes(s, torch.bfloat16),
       eager=lambda q, s, **kw: eager_dequant(_as_2d(q), _as_2d(s)),
       variants=tuple((str(dt).split(".")[-1], {"out_dtype": dt})
                      for dt in (torch.bfloat16, torch.float16, torch.float32))),
    Op("quant_fp8_block[e4m3->e4m3,requant ue8m0]", "quant_fp8_block", _make_requant,
       lambda s: 2 * _nbytes(s, E4M3), host_sync=True),  # validates x_scale_inv on the host
    Op("quant_nvfp4[bf16]", "quant_nvfp4", _make_nvfp4,
       lambda s: _nbytes(s, torch.bfloat16) + _nbytes(s, torch.uint8) // 2 + _nbytes(s, E4M3) // 16,
       eager=lambda x, **kw: eager_quant_nvfp4(_as_2d(x)),
       variants=tuple((str(dt).split(".")[-1], {"dtype": dt}) for dt in (torch.bfloat16, torch.float16,
                                                                          torch.float32))
       + (("float32,amax~1e-30 (IEEE-division relaunch)", {"dtype": torch.float32, "scale": 1e-30}),)),
    Op("dequant_nvfp4[->bf16]", "dequant_nvfp4", _make_dequant_nvfp4,
       lambda s: _nbytes(s, torch.uint8) // 2 + _nbytes(s, E4M3) // 16 + _nbytes(s, torch.bfloat16),
       eager=lambda p, w, s2, **kw: eager_dequant_nvfp4(_as_2d(p), _as_2d(w), s2.reshape(-1)[:1]),
       variants=tuple((str(dt).split(".")[-1], {"out_dtype": dt})
                      for dt in (torch.bfloat16, torch.float16, torch.float32))),
    Op("nvfp4_amax[bf16]", "nvfp4_amax", _make_nvfp4, lambda s: _nbytes(s, torch.bfloat16), host_sync=True),
    Op("quant_fp8_channel[bf16]", "quant_fp8_channel", _make_quant_channel, lambda s: 3 * _numel(s),
       host_sync=True, variants=(("ue8m0", {"scale_fmt": "ue8m0"}), ("bf16-scale", {"scale_dtype": torch.bfloat16}))),
    Op("dequant_fp8_channel[->bf16]", "dequant_fp8_channel", _make_dequant_channel, lambda s: 3 * _numel(s),
       variants=(("float32", {"out_dtype": torch.float32}),)),
    Op("quant_int4[bf16->int4]", "quant_int4", _make_quant_int4, _int4_bytes, host_sync=True,
       variants=(("ct-cpu", {"rule": "ct-cpu"}), ("float16", {"dtype": torch.float16}),
                 ("float32", {"dtype": torch.float32}), ("group 32", {"group_size": 32}))),
    Op("dequant_int4[int4->bf16]", "dequant_int4", _make_dequant_int4, _int4_bytes,
       variants=(("float32", {"out_dtype": torch.float32}),)),
    *(op for fmt, elem_bytes in (("mxfp8", 1.0), ("mxfp4", 0.5)) for op in (
        Op(f"quant_mx[bf16->{fmt}]", "quant_mx", _make_quant_mx(fmt), _mx_bytes(elem_bytes), host_sync=True,
           variants=(("ct-rule", {"rule": "ct"}), ("ocp-rule", {"rule": "ocp"}))),
        Op(f"dequant_mx[{fmt}->bf16]", "dequant_mx", _make_dequant_mx(fmt), _mx_bytes(elem_bytes),
           variants=(("float32", {"out_dtype": torch.float32}),)))),
]


def uncovered(ops) -> list[str]:
    """Public kernel wrappers with a twin of the same name that no Op exercises."""
    covered = {op.fn for op in ops}
    return sorted(name for name in fk.__all__ if hasattr(twin, name) and callable(getattr(fk, name))
                  and name not in covered)


def _apply_variant(op: Op, args, kwargs, variant: dict):
    """Correctness variants: an input dtype (cast the first argument) or extra keyword arguments."""
    variant = dict(variant)
    dtype, scale = variant.pop("dtype", None), variant.pop("scale", None)
    if dtype is not None:
        args = (args[0].to(dtype),) + tuple(args[1:])
    if scale is not None:
        args = (args[0] * scale,) + tuple(args[1:])
    return args, {**kwargs, **variant}


# --------------------------------------------------------------------------------------------------
# (a) correctness: every op on the device against its twin on the CPU, bytes equal
# --------------------------------------------------------------------------------------------------

def _to_cpu(t):
    return t.cpu() if isinstance(t, torch.Tensor) else tuple(_to_cpu(u) for u in t)


def _flat(t):
    return [t] if isinstance(t, torch.Tensor) else [u for v in t for u in _flat(v)]


def _bytes_equal(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, int, bool]:
    """(equal bytes except where both are NaN, mismatching elements, NaN positions identical).

    NaN payloads are not compared: a GPU writes 0x7FFF as bf16 NaN, torch on CPU 0x7FC0."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False, -1, False
    if a.is_floating_point() and a.element_size() > 1:
        na, nb = torch.isnan(a), torch.isnan(b)
        width = {2: torch.int16, 4: torch.int32}[a.element_size()]
        diff = (a.view(width) != b.view(width)) & ~(na & nb)
        return not bool(diff.any()), int(diff.sum()), bool(torch.equal(na, nb))
    diff = a.reshape(-1).view(torch.uint8) != b.reshape(-1).view(torch.uint8)
    return not bool(diff.any()), int(diff.sum()), True


def correctness_cases(dry: bool) -> list[tuple[int, str, dict, tuple]]:
    """(op index, variant label, variant, shape): every variant at one ragged 2D shape, the default
    at every shape (ragged 2D and 3D, tiny, a real width)."""
    shapes = [(1, 16), (130, 144), (2, 130, 144)] if dry else [(1, 1), (300, 700), (3, 200, 130), (129, 4112),
                                                                (1024, 7168), (4, 512, 2048)]
    cases = []
    for i, op in enumerate(OPS):
        cases += [(i, "default", {}, shape) for shape in shapes]
        cases += [(i, label, variant, shapes[1]) for label, variant in op.variants]
    return cases


def run_case(case, device: str) -> dict:
    """One correctness case: the op on `device` against its twin on the CPU (inputs made on the CPU)."""
    i, label, variant, shape = case
    op = OPS[i]
    if op.fn in ("quant_nvfp4", "dequant_nvfp4", "nvfp4_amax") and shape[-1] % 16:
        shape = (*shape[:-1], max(16, shape[-1] // 16 * 16))
    gen = torch.Generator().manual_seed(zlib.crc32(repr((i, label, shape)).encode()))
    args, kwargs = _apply_variant(op, *op.make(shape, "cpu", gen), variant)
    rec = {"op": op.name, "variant": label, "shape": list(shape), "device": device}
    try:
        want = _to_cpu(getattr(twin, op.fn)(*args, **kwargs))
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        got = _to_cpu(getattr(fk, op.fn)(*(a.to(device) for a in args), **moved))
        checks = [_bytes_equal(g, w) for g, w in zip(_flat(got), _flat(want))]
        rec.update(equal=all(c[0] for c in checks), mismatches=sum(max(c[1], 0) for c in checks),
                   nan_positions_equal=all(c[2] for c in checks))
    except Exception as e:  # noqa: BLE001 - recorded, the step goes on
        rec.update(equal=False, mismatches=-1, nan_positions_equal=False, error=f"{type(e).__name__}: {e}"[:300])
    return rec


def correctness(res: Results, device: str, dry: bool) -> None:
    """On the GPU the cases run in a pool of processes (FP8NORM_GPU_CHECK_WORKERS, default up to 8):
    each new specialization is a Triton compile of a few seconds, and they compile in parallel (into
    Triton's shared on-disk cache)."""
    cases = correctness_cases(dry)
    default = max(1, min(8, (os.cpu_count() or 2) - 1)) if device == "cuda" else 1
    workers = int(os.environ.get("FP8NORM_GPU_CHECK_WORKERS", default))
    if workers > 1:
        import concurrent.futures
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            for rec in pool.map(run_case, cases, [device] * len(cases)):
                res.add("correctness", rec)
    else:
        for case in cases:
            res.add("correctness", run_case(case, device))
    _nan_inputs(res, device)


def _nan_inputs(res: Results, device: str) -> None:
    """NaN/Inf input and NaN codes: the kernel raises the same one-line error as the twin."""
    cases = []
    for bad in (float("nan"), float("inf")):
        x = torch.randn(200, 300, dtype=torch.bfloat16)
        x[150, 260] = bad
        cases += [(f"quant_fp8_block[{bad}]", "quant_fp8_block", (x,), {}),
                  (f"quant_nvfp4[{bad}]", "quant_nvfp4", (x[:, :288],), {})]
    codes = torch.zeros(4, 32, dtype=torch.uint8)
    codes[1, 2] = 0x7F
    cases.append(("requant[nan code]", "quant_fp8_block", (codes.view(E4M3),), {"x_scale_inv": torch.ones(1, 1)}))
    for name, fn, args, kwargs in cases:
        msgs = []
        for impl, dev in ((twin, "cpu"), (fk, device)):
            try:
                getattr(impl, fn)(*(a.to(dev) for a in args), **{k: v.to(dev) for k, v in kwargs.items()})
                msgs.append(None)
            except ValueError as e:
                msgs.append(str(e))
        res.add("correctness", {"op": name, "variant": "nonfinite-raises", "shape": list(args[0].shape),
                                "device": device, "equal": msgs[0] is not None and msgs[0] == msgs[1],
                                "mismatches": 0 if msgs[0] == msgs[1] else 1, "nan_positions_equal": True,
                                "message": msgs[1]})


# --------------------------------------------------------------------------------------------------
# (b) bandwidth
# --------------------------------------------------------------------------------------------------

def bench_us(fn: Callable, device: str, graph: bool = True) -> tuple[float, str]:
    """Median microseconds of `fn()` back to back: CUDA graph replay (launch overhead excluded) when
    `fn` can be captured, else triton's do_bench (CUDA events); wall clock on the CPU (dry run)."""
    if device == "cpu":  # the dry run: exercised, not measured
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6, "perf_counter"
    import triton.testing

    if graph:
        try:
            return triton.testing.do_bench_cudagraph(fn, rep=50) * 1e3, "cuda-graph"
        except Exception:  # noqa: BLE001 - a host sync inside: not capturable
            torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3, "do_bench"


def _gbps(nbytes: int, us: float) -> float:
    return round(nbytes / us / 1e3, 1) if us > 0 else 0.0


def bandwidth(res: Results, device: str, dry: bool) -> None:
    shapes = DRY_SHAPES if dry else FULL_SHAPES
    for shape in shapes:
        copies = {}
        for op in OPS:
            nbytes = op.bytes(shape)
            args, kwargs = op.make(shape, device, None)
            fn = getattr(fk, op.fn)
            if device == "cuda":
                torch.cuda.synchronize()
            # the copy of the same bytes (half read, half written), measured here, in the same run
            if nbytes not in copies:
                src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
                dst = torch.empty_like(src)
                copies[nbytes] = bench_us(lambda: dst.copy_(src), device)[0]
                del src, dst
            copy_us = copies[nbytes]
            extra = {"check_finite": False} if op.fn in ("quant_fp8_block", "quant_nvfp4") else {}
            kernel_us, method = bench_us(lambda: fn(*args, **kwargs, **extra), device, graph=not op.host_sync)
            rec = {"op": op.name, "shape": list(shape), "bytes": nbytes, "kernel_us": round(kernel_us, 2),
                   "kernel_gbps": _gbps(nbytes, kernel_us), "copy_us": round(copy_us, 2),
                   "copy_gbps": _gbps(nbytes, copy_us), "pct_of_copy": round(100 * copy_us / kernel_us, 1),
                   "method": method, "eager_us": None, "x_eager": None}
            if op.eager is not None and _nbytes(shape, args[0].dtype) <= EAGER_MAX_BYTES:
                try:
                    eager_us = bench_us(lambda: op.eager(*args, **kwargs), device, graph=False)[0]
                    rec.update(eager_us=round(eager_us, 2), x_eager=round(eager_us / kernel_us, 2))
                except torch.OutOfMemoryError:
                    rec["eager_note"] = "out of memory"
            res.add("bandwidth", rec)
            if shape == shapes[0]:
                res.add("wrapper_overhead", wrapper_overhead(op, fn, args, kwargs, kernel_us, shape, device))
            del args, kwargs
            if device == "cuda":
                torch.cuda.empty_cache()
    res.set("compiled_kernels", compiled_kernels())


def compiled_kernels() -> list[dict]:
    """Registers and spills of every kernel this process compiled, as the machine's own Triton built
    them (to set against tools/aot_compile.py's figures); empty if its caches are laid out otherwise."""
    from triton.runtime.jit import JITFunction

    out = []
    for module in fk.kernel_modules():
        for name in dir(module):
            fn = getattr(module, name)
            if not (name.endswith("_kernel") and isinstance(fn, JITFunction)):
                continue
            try:
                for cache in fn.device_caches.values():
                    for k in cache[0].values():
                        out.append({"kernel": name, "num_warps": k.metadata.num_warps, "registers": k.n_regs,
                                    "spills": k.n_spills, "shared_bytes": k.metadata.shared})
            except Exception:  # noqa: BLE001 - a Triton with other internals: nothing to report
                pass
    return out


def wrapper_overhead(op, fn, args, kwargs, kernel_us, shape, device) -> dict:
    """A whole public call (checks, allocation, launch, the host sync of the NaN/Inf check), one at a
    time as a converter calls it, against the kernel alone."""
    calls = 20 if device == "cuda" else 2
    fn(*args, **kwargs)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(*args, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
    call_us = (time.perf_counter() - t0) / calls * 1e6
    return {"op": op.name, "shape": list(shape), "call_us": round(call_us, 2), "kernel_us": round(kernel_us, 2),
            "overhead_us": round(call_us - kernel_us, 2)}


def compiled(res: Results, device: str, dry: bool, budget_s: float = 45.0) -> None:
    """x torch.compile: one compile per op (dynamic shapes, every shape through it), bounded: an op
    whose compile takes more than `budget_s` is recorded and the next op goes on."""
    shapes = DRY_SHAPES[:1] if dry else FULL_SHAPES
    kernel_us = {(r["op"], tuple(r["shape"])): r["kernel_us"] for r in res.data["bandwidth"]}
    for op in OPS:
        if op.eager is None:
            continue
        cfn = torch.compile(op.eager, dynamic=True, backend="eager" if dry else "inductor")
        for shape in shapes:
            args, kwargs = op.make(shape, device, None)
            if _nbytes(shape, args[0].dtype) > EAGER_MAX_BYTES:
                continue
            t0 = time.perf_counter()
            try:
                cfn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - recorded
                res.add("torch_compile", {"op": op.name, "shape": list(shape), "error": f"{type(e).__name__}: {e}"[:300]})
                break
            first_s = time.perf_counter() - t0
            us = bench_us(lambda: cfn(*args, **kwargs), device, graph=False)[0]
            k = kernel_us.get((op.name, tuple(shape)))
            res.add("torch_compile", {"op": op.name, "shape": list(shape), "first_call_s": round(first_s, 2),
                                      "compiled_us": round(us, 2), "kernel_us": k,
                                      "x_compile": round(us / k, 2) if k else None,
                                      "backend": "eager (dry run)" if dry else "inductor"})
            if first_s > budget_s:
                break


# --------------------------------------------------------------------------------------------------
# (c) a whole checkpoint: fp8norm quantize vs cp of the same bytes on the same disk
# --------------------------------------------------------------------------------------------------

def write_synthetic_llama(dst: Path, target_bytes: float, device: str) -> int:
    """A Llama-shaped bf16 checkpoint of about target_bytes (hidden 4096, MLP 14336; tiny in a dry run)."""
    from safetensors.torch import save_file

    h, inter, kv = (4096, 14336, 1024) if target_bytes > 1e8 else (256, 512, 128)
    layer = {"self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
             "self_attn.o_proj.weight": (h, h), "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h),
             "mlp.down_proj.weight": (h, inter), "input_layernorm.weight": (h,),
             "post_attention_layernorm.weight": (h,)}
    per_layer = sum(2 * a * (b[0] if b else 1) for a, *b in layer.values())
    n_layers = max(1, int(target_bytes // per_layer))
    dst.mkdir(parents=True)
    weight_map, total = {}, 0
    for i in range(n_layers):
        fname = f"model-{i + 1:05d}-of-{n_layers:05d}.safetensors"
        tensors = {f"model.layers.{i}.{k}": (torch.randn(s, device=device, dtype=torch.bfloat16) * 0.02).cpu()
                   for k, s in layer.items()}
        save_file(tensors, str(dst / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
        total += sum(t.nbytes for t in tensors.values())
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    (dst / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": inter,
        "num_hidden_layers": n_layers, "num_attention_heads": h // 128, "num_key_value_heads": kv // 128,
        "head_dim": 128, "vocab_size": 128, "torch_dtype": "bfloat16"}))
    return total


def _cp_sync(src: Path, dst: Path) -> float:
    """Seconds of `cp -r` + `sync` (what an output's fsyncs amount to) of `src`; the copy is removed."""
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    subprocess.run(["sync"], check=False)
    secs = time.perf_counter() - t0
    shutil.rmtree(dst)
    return secs


def _stages(s) -> dict:
    """An engine run's split (fp8norm.engine.RunStats), in seconds."""
    return {k: round(getattr(s, k), 2) for k in ("wall_s", "read_s", "compute_s", "write_s", "hash_s", "fsync_s",
                                                  "verify_s")}


def checkpoint(res: Results, device: str, dry: bool) -> None:
    from fp8norm.quantize import quantize, repack

    # `timeout` sends SIGTERM: exit through the `finally` below, which deletes the scratch checkpoints.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    scratch = Path(tempfile.mkdtemp(prefix="fp8norm-gpu-check-", dir=os.environ.get("FP8NORM_SCRATCH")))
    try:
        free = shutil.disk_usage(scratch).free
        target = 4e6 if dry else min(CHECKPOINT_GB * 1e9, free / 3.2)  # source + cp + output must fit
        src, cp_dst, out = scratch / "src", scratch / "cp", scratch / "fp8"
        t0 = time.perf_counter()
        total = write_synthetic_llama(src, target, device)
        gen_s = time.perf_counter() - t0
        cp_s = _cp_sync(src, cp_dst)
        res.set("checkpoint", {"bytes": total, "generate_s": round(gen_s, 2), "cp_s": round(cp_s, 2)})
        s = quantize(str(src), str(out), device=device)
        t0 = time.perf_counter()
        subprocess.run(["sync"], check=False)
        sync_s = time.perf_counter() - t0
        res.set("checkpoint", {
            "bytes": total, "generate_s": round(gen_s, 2), "cp_s": round(cp_s, 2), "cp_gbps": round(total / cp_s / 1e9, 2),
            "quantize_wall_s": round(s.wall_s, 2), "read_s": round(s.read_s, 2), "compute_s": round(s.compute_s, 2),
            "write_s": round(s.write_s, 2), "hash_s": round(s.hash_s, 2), "fsync_s": round(s.fsync_s, 2),
            "verify_s": round(s.verify_s, 2), "sync_after_s": round(sync_s, 2), "device": s.device,
            "quantize_gbps": round(s.bytes_in / s.wall_s / 1e9, 2), "x_cp": round(s.wall_s / cp_s, 2),
            "bytes_out": s.bytes_out, "note": "the source was just written: cp and quantize read it from the page "
                                               "cache where it fits; cp includes a sync, quantize's sync_after_s is extra"})
        print(s.format(), flush=True)
        # repack (pure I/O) of the output against cp + sync of it, and what a command pays before its
        # engine starts: the imports (torch's CUDA libraries) in a fresh interpreter
        r = repack(str(out), str(scratch / "repack"))
        shutil.rmtree(scratch / "repack")
        out_cp_s = _cp_sync(out, cp_dst)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import fp8norm.pipeline"], check=True)
        res.set("checkpoint", {**res.data["checkpoint"], "import_s": round(time.perf_counter() - t0, 2),
                               "repack": {**_stages(r), "bytes": r.bytes_in, "cp_s": round(out_cp_s, 2),
                                          "x_cp": round(r.wall_s / out_cp_s, 2)}})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# meta and summary
# --------------------------------------------------------------------------------------------------

def meta(res: Results, device: str, dry: bool) -> None:
    import triton

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "dry_run": dry, "device": device, "python": platform.python_version(), "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda, "host": platform.node(),
            "num_warps": {m.__name__.rsplit(".", 1)[-1]: getattr(m, "NUM_WARPS", None) for m in fk.kernel_modules()}}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sm_count=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                    memory_gb=round(p.total_memory / 1e9, 1))
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    else:
        info.update(gpu=None, driver=None)
    res.set("meta", info)
    res.set("uncovered", uncovered(OPS))


def summary(res: Results) -> str:
    d = res.data
    m = d["meta"]
    lines = [f"fp8norm GPU check {m.get('date')}: {m.get('gpu') or 'CPU (dry run)'}, driver {m.get('driver')}, "
             f"torch {m.get('torch')}, triton {m.get('triton')}, CUDA {m.get('cuda')}"]
    lines += [f"step {k}: {v.get('status')}" + (f" ({v.get('seconds')} s)" if v.get("seconds") is not None else "")
              for k, v in d["steps"].items()]
    c = d["correctness"]
    bad = [r for r in c if not r.get("equal")]
    lines.append(f"correctness: {len(c) - len(bad)}/{len(c)} cases bytes-equal to the twin"
                 + "".join(f"\n  DIFFERS {r['op']} {r['variant']} {r['shape']}: {r.get('error') or r['mismatches']}"
                           for r in bad[:20]))
    comp = {(r["op"], tuple(r["shape"])): r.get("x_compile") for r in d["torch_compile"]}

    def fmt(v):
        return "-" if v is None else v

    lines.append(f"{'op':42} {'shape':>18} {'GB/s':>7} {'% copy':>7} {'x eager':>8} {'x compile':>9}")
    for r in d["bandwidth"]:
        lines.append(f"{r['op']:42} {'x'.join(map(str, r['shape'])):>18} {r['kernel_gbps']:>7} {r['pct_of_copy']:>7} "
                     f"{fmt(r['x_eager']):>8} {fmt(comp.get((r['op'], tuple(r['shape'])))):>9}")
    for r in d["wrapper_overhead"]:
        lines.append(f"wrapper {r['op']} {r['shape']}: {r['call_us']} us a call, kernel {r['kernel_us']} us, "
                     f"overhead {r['overhead_us']} us")
    if d["checkpoint"]:
        k = d["checkpoint"]
        lines.append(f"checkpoint {k['bytes'] / 1e9:.2f} GB: quantize {k['quantize_wall_s']} s (read {k['read_s']}, "
                     f"compute {k['compute_s']}, write {k['write_s']}; of these hash {k.get('hash_s')}, fsync "
                     f"{k.get('fsync_s')}; verify {k.get('verify_s')}) vs cp {k['cp_s']} s: x{k['x_cp']}")
        if "repack" in k:
            r = k["repack"]
            lines.append(f"repack of the output {r['bytes'] / 1e9:.2f} GB: {r['wall_s']} s (read {r['read_s']}, write "
                         f"{r['write_s']}; hash {r['hash_s']}, fsync {r['fsync_s']}) vs cp {r['cp_s']} s: x{r['x_cp']}; "
                         f"imports before any command starts {k['import_s']} s")
    for r in d.get("compiled_kernels", []):
        lines.append(f"compiled here: {r['kernel']} {r['num_warps']} warps, {r['registers']} registers, "
                     f"{r['spills']} spills, {r['shared_bytes']} B shared")
    if d["uncovered"]:
        lines.append(f"not covered by the check: {', '.join(d['uncovered'])}")
    return "\n".join(lines)


STEPS = {"meta": meta, "correctness": correctness, "bandwidth": bandwidth, "compiled": compiled,
         "checkpoint": checkpoint}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=[*STEPS, "summary", "mark"])
    ap.add_argument("args", nargs="*", help="mark: NAME STATUS [SECONDS]")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes (the suite's test of this script)")
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-check"))
    a = ap.parse_args(argv)
    res = Results(Path(a.out))
    if a.step == "mark":
        name, status, *secs = a.args
        res.step(name, status, seconds=float(secs[0]) if secs else None)
    elif a.step == "summary":
        pass
    else:
        device = "cpu" if a.dry_run else "cuda"
        if device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --dry-run on a CPU machine")
        t0 = time.perf_counter()
        res.step(a.step, "running")
        STEPS[a.step](res, device, a.dry_run)
        res.step(a.step, "ok", seconds=round(time.perf_counter() - t0, 1))
    text = summary(res)
    (Path(a.out) / "gpu_check.txt").write_text(text + "\n")
    if a.step == "summary":
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
