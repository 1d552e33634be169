#!/usr/bin/env python
"""Compile every fp8norm kernel for real GPUs (sm_90 H100/H200, sm_100 B200) on a machine without one.

Each kernel module's cases (tools/kernel_cases.py) call its public wrapper on CPU tensors; every
launch is turned into a compile for each target with the specialization a CUDA launch of the same
arguments gets (16-byte-aligned pointers, sizes divisible by 16: Triton's own binder computes it), so
what is reported is what would run. Per kernel and target: registers, spills, shared memory, SASS
instructions per thread (main path) and per element, the widths of the global loads and stores
(128-bit present?), and resident blocks per SM. `--json` prints the same as JSON (tests read it);
`--sweep-warps 2,4,8,16` compiles each case at those warp counts to choose `NUM_WARPS`.

    python tools/aot_compile.py
    python tools/aot_compile.py --targets 90 --json
    python tools/aot_compile.py --sweep-warps 4,8,16 --targets 90
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime import jit as triton_jit

import torch

import fp8norm.kernels as fk
import kernel_cases  # tools/kernel_cases.py, beside this script

# Per-SM limits of sm_90 and sm_100 (same for both): registers, warps, blocks, shared memory (bytes).
SM_REGISTERS = 65536
SM_MAX_WARPS = 64
SM_MAX_BLOCKS = 32
SM_SHARED = 228 * 1024
BLOCK_SHARED_RESERVED = 1024
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256

_TOOL_DIR = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _tool(name: str, cubin: bytes, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([os.path.join(_TOOL_DIR, name), *flags, f.name], capture_output=True, text=True,
                              check=True).stdout


def resource_usage(cubin: bytes) -> dict:
    """Registers, spill stack and local memory of a cubin (cuobjdump -res-usage)."""
    usage = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", _tool("cuobjdump", cubin, "-res-usage")))
    return {"registers": int(usage["REG"]), "spill_stack_bytes": int(usage["STACK"]),
            "local_bytes": int(usage["LOCAL"])}


_SASS_LINE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def sass_opcodes(cubin: bytes) -> list[str]:
    """The kernel's SASS opcodes in order (cuobjdump -sass), NOPs dropped."""
    return [m.group(2) for m in _SASS_LINE.finditer(_tool("cuobjdump", cubin, "-sass")) if m.group(2) != "NOP"]


def main_path(ops: list[str]) -> list[str]:
    """Instructions a thread runs on the common path: up to the last EXIT before the first subroutine.

    The kernels are straight-line per tile (edges are predicated), so this static count is what
    each thread executes; IEEE division's rarely taken slow path is a subroutine placed after the
    EXIT (ending in RET) and is left out, as is the trailing `BRA` to itself.
    """
    end = ops.index("RET") if "RET" in ops else len(ops)
    exits = [i for i, op in enumerate(ops[:end]) if op == "EXIT"]
    return ops[:exits[-1] + 1] if exits else ops[:end]


def access_widths(ops: list[str], kind: str) -> list[int]:
    """Bit widths of the global loads (LDG) or stores (STG), e.g. [128, 8]; atomics not included."""
    widths = set()
    for op in ops:
        if op.startswith(kind + "."):
            m = re.search(r"\.(U8|S8|U16|S16|64|128)\b", op)
            widths.add({"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128}[m.group(1)] if m else 32)
    return sorted(widths, reverse=True)


def blocks_per_sm(registers: int, num_warps: int, shared: int) -> int:
    per_warp = math.ceil(registers * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = SM_REGISTERS // (per_warp * num_warps)
    by_warps = SM_MAX_WARPS // num_warps
    by_smem = SM_SHARED // (shared + BLOCK_SHARED_RESERVED)
    return min(by_regs, by_warps, by_smem, SM_MAX_BLOCKS)


class Compiler:
    """The launch hook: compiles what a CUDA launch of the same arguments would, for one target."""

    def __init__(self, arch: int, num_warps: int | None = None):
        self.target = GPUTarget("cuda", arch, 32)
        self.backend = make_backend(self.target)
        self.num_warps = num_warps
        self.compiled = []  # (kernel name, compiled kernel, elements per program)

    def __call__(self, fn, grid, args, kwargs):
        kwargs = dict(kwargs)
        kwargs.setdefault("debug", False)
        if self.num_warps is not None:
            kwargs["num_warps"] = self.num_warps
        binder = triton_jit.create_function_from_signature(fn.signature, fn.params, self.backend)
        bound, spec, opts = binder(*args, **kwargs)
        opts, sig, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound, spec, opts)
        k = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=self.target, options=opts.__dict__)
        programs = math.prod(tuple(grid) + (1,) * (3 - len(grid)))
        elements = max(a.numel() for a in args if isinstance(a, torch.Tensor))
        self.compiled.append((fn.fn.__name__, k, elements // programs))
        return k


def compile_case(call, arch: int, num_warps: int | None = None) -> list[dict]:
    """Compile every launch of `call()` for sm_`arch`; one report per launched kernel."""
    hook = Compiler(arch, num_warps)
    with fk.capture_compiles(hook):
        try:
            call()
        except ValueError:
            if not hook.compiled:
                raise  # the wrapper's checks after launch read uninitialized outputs; before, a real error
    return [report(name, k, elements, arch) for name, k, elements in hook.compiled]


def report(name: str, k, elements_per_program: int, arch: int) -> dict:
    cubin, ptx = k.asm["cubin"], k.asm["ptx"]
    usage = resource_usage(cubin)
    ops = sass_opcodes(cubin)
    path = main_path(ops)
    threads = 32 * k.metadata.num_warps
    loads, stores = access_widths(path, "LDG"), access_widths(path, "STG")
    return {
        "kernel": name,
        "arch": arch,
        **usage,
        "shared_bytes": k.metadata.shared,
        "num_warps": k.metadata.num_warps,
        "elements_per_program": elements_per_program,
        "sass_static": len(ops),
        "sass_per_thread": len(path),
        "sass_per_element": round(len(path) * threads / elements_per_program, 2),
        "load_bits": loads,
        "store_bits": stores,
        "ldg_128": 128 in loads,
        "stg_128": 128 in stores,
        "blocks_per_sm": blocks_per_sm(usage["registers"], k.metadata.num_warps, k.metadata.shared),
        "satfinite_e4m3_cast": bool(re.search(r"cvt\.rn\.satfinite\.e4m3x2\.f32", ptx)),
        "rne_bf16_cast": bool(re.search(r"cvt\.rn\.bf16(x2)?\.f32", ptx)),
        # the interpreter path's bit-level rounding (0x7FFF carry for bf16, 0x400000 magic for e4m3)
        "software_rounding": bool(re.search(r"\b(32767|4194304)\b", ptx)),
        "ieee_div": "div.rn.f32" in ptx,
        "approx_div": bool(re.search(r"div\.(full|approx)\.f32", ptx)),
        "ptx": ptx,
    }


def compile_all(targets, sweep_warps=None, only: str | None = None, ptx_dir: str | None = None) -> list[dict]:
    results = []
    cases = {k: v for k, v in kernel_cases.aot_cases().items() if only is None or re.search(only, k)}
    for arch in targets:
        for case, call in cases.items():
            for warps in sweep_warps or [None]:
                for r in compile_case(call, arch, warps):
                    r = {"case": case, **r}
                    if ptx_dir:
                        os.makedirs(ptx_dir, exist_ok=True)
                        fname = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{case}.{r['kernel']}.w{r['num_warps']}.sm{arch}.ptx")
                        with open(os.path.join(ptx_dir, fname), "w") as f:
                            f.write(r["ptx"])
                    del r["ptx"]
                    results.append(r)
    return results


def print_table(results: list[dict]) -> None:
    head = (f"{'case':44} {'kernel':22} {'sm':>3} {'warps':>5} {'regs':>4} {'spill':>5} {'smem':>6} "
            f"{'SASS/thr':>8} {'/elem':>6} {'ld bits':>8} {'st bits':>8} {'blk/SM':>6}")
    print(head)
    for r in results:
        print(f"{r['case']:44} {r['kernel']:22} {r['arch']:>3} {r['num_warps']:>5} {r['registers']:>4} "
              f"{r['spill_stack_bytes'] + r['local_bytes']:>5} {r['shared_bytes']:>6} {r['sass_per_thread']:>8} "
              f"{r['sass_per_element']:>6} {','.join(map(str, r['load_bits'])):>8} "
              f"{','.join(map(str, r['store_bits'])):>8} {r['blocks_per_sm']:>6}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="90,100", help="comma-separated SM versions (default 90,100)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--sweep-warps", help="comma-separated num_warps to compile each case at (default: the "
                                          "wrappers' own)")
    ap.add_argument("--only", help="regular expression: only the cases whose name matches")
    ap.add_argument("--out", help="write each compiled kernel's PTX into this folder (keep it out of git)")
    args = ap.parse_args(argv)
    targets = [int(a) for a in args.targets.split(",")]
    sweep = [int(w) for w in args.sweep_warps.split(",")] if args.sweep_warps else None
    results = compile_all(targets, sweep, args.only, args.out)
    if args.json:
        json.dump(results, sys.stdout, indent=1)
        print()
    else:
        print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
