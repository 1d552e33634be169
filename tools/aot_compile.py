#!/usr/bin/env python
"""Compile every fp8norm kernel ahead of time for real GPUs (sm_90 H100, sm_100 B200) without a GPU.

Prints, per kernel variant and target: registers, spills, shared memory, warps, and whether the PTX
holds the saturating round-to-nearest-even e4m3 cast and IEEE divisions. `--json` prints the same as
JSON (the tests read it); `--out DIR` also writes the .ptx files there (keep them out of git).

    python tools/aot_compile.py
    python tools/aot_compile.py --targets 90 --json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

# triton.compile needs real JIT functions: decorate the kernels without the interpreter.
os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from fp8norm.kernels import dequant_fp8_block_kernel, quant_fp8_block_kernel  # noqa: E402
from fp8norm.kernels import dequant_nvfp4_kernel, quant_nvfp4_kernel  # noqa: E402
from fp8norm.kernels.quant_nvfp4 import BLOCK_M as NVFP4_BLOCK_M, BLOCK_N as NVFP4_BLOCK_N  # noqa: E402
from fp8norm.kernels._launch import LAUNCH_OPTIONS, NUM_WARPS  # noqa: E402

_PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32", "fp8": "*fp8e4nv", "u8": "*u8"}
_SCALE_OUT = {"fp32": 0, "bf16": 1, "e8m0": 2}
_SCALE_PTR = {"fp32": "*fp32", "bf16": "*bf16", "e8m0": "*u8"}


def quant_variants():
    """(name, kernel, signature, constexprs) for each compiled variant of the quant kernel."""
    modes = (("fp32", 0, False), ("bf16", 16, False), ("e8m0", 23, False), ("fp32", 0, True))
    cases = [(in_dt, *m) for in_dt in ("bf16", "fp16", "fp32") for m in modes]
    cases += [("fp8", "fp32", 23, False), ("fp8", "e8m0", 23, False)]  # requantization (FP8 in)
    for in_dt, scale_out, drop_bits, given in cases:
        name = f"quant_fp8_block[{in_dt},scale={scale_out},drop={drop_bits},given={given}]"
        sig = {"x_ptr": _PTR[in_dt], "q_ptr": _PTR["fp8"], "s_in_ptr": "*fp32",
               "s_out_ptr": _SCALE_PTR[scale_out], "xs_ptr": "*fp32", "M": "i32", "N": "i32",
               "stride_xe": "i64", "stride_xm": "i32", "stride_xn": "i32",
               "stride_qe": "i64", "stride_qm": "i32", "stride_se": "i32", "stride_sm": "i32",
               "amax_floor": "fp32"}
        const = {"BLOCK_M": 128, "BLOCK_N": 128, "SCALE_DROP_BITS": drop_bits,
                 "SCALE_OUT": _SCALE_OUT[scale_out], "GIVEN_SCALE": given, "X_SCALED": in_dt == "fp8"}
        yield name, quant_fp8_block_kernel, sig, const


def dequant_variants():
    for out_dt in ("bf16", "fp16", "fp32"):
        sig = {"q_ptr": _PTR["fp8"], "s_ptr": "*fp32", "out_ptr": _PTR[out_dt], "M": "i32", "N": "i32",
               "stride_qe": "i64", "stride_qm": "i32", "stride_qn": "i32",
               "stride_oe": "i64", "stride_om": "i32", "stride_se": "i32", "stride_sm": "i32"}
        yield f"dequant_fp8_block[{out_dt}]", dequant_fp8_block_kernel, sig, {"BLOCK_M": 128, "BLOCK_N": 128}


def nvfp4_variants():
    """NVFP4 quant from bf16 and from block FP8 (fp32 source scales), and dequant to bf16."""
    tile = {"BLOCK_M": NVFP4_BLOCK_M, "BLOCK_N": NVFP4_BLOCK_N, "GROUP": 16}
    for in_dt in ("bf16", "fp8"):
        sig = {"x_ptr": _PTR[in_dt], "xs_ptr": "*fp32", "s2_ptr": "*fp32", "p_ptr": "*u8", "w_ptr": "*u8",
               "M": "i32", "N": "i32", "stride_xe": "i64", "stride_xm": "i32", "stride_xn": "i32",
               "stride_xse": "i32", "stride_xsm": "i32", "stride_pe": "i64", "stride_pm": "i32",
               "stride_we": "i64", "stride_wm": "i32"}
        const = {**tile, "SRC_BM": 128, "SRC_BN": 128, "X_SCALED": in_dt == "fp8"}
        yield f"quant_nvfp4[{in_dt}" + (",src=fp32]" if in_dt == "fp8" else "]"), quant_nvfp4_kernel, sig, const
    sig = {"p_ptr": "*u8", "w_ptr": _PTR["fp8"], "s2_ptr": "*fp32", "out_ptr": _PTR["bf16"], "M": "i32", "N": "i32",
           "stride_pe": "i64", "stride_pm": "i32", "stride_pn": "i32", "stride_we": "i64", "stride_wm": "i32",
           "stride_wn": "i32", "stride_oe": "i64", "stride_om": "i32"}
    yield "dequant_nvfp4[bf16]", dequant_nvfp4_kernel, sig, tile


def resource_usage(cubin: bytes) -> dict:
    """Registers, spill stack and local memory of a cubin, read by the cuobjdump shipped with triton."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out))
    return {"registers": int(usage["REG"]), "spill_stack_bytes": int(usage["STACK"]),
            "local_bytes": int(usage["LOCAL"])}


def compile_one(kernel, signature, constexprs, arch: int, num_warps: int = NUM_WARPS) -> dict:
    sig = dict(signature)
    sig.update({k: "constexpr" for k in constexprs})
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(LAUNCH_OPTIONS, num_warps=num_warps))
    ptx = k.asm["ptx"]
    return {
        "arch": arch,
        **resource_usage(k.asm["cubin"]),
        "shared_bytes": k.metadata.shared,
        "num_warps": k.metadata.num_warps,
        "cubin_bytes": len(k.asm["cubin"]),
        "satfinite_e4m3_cast": bool(re.search(r"cvt\.rn\.satfinite\.e4m3x2\.f32", ptx)),
        "ieee_div": "div.rn.f32" in ptx,
        "approx_div": bool(re.search(r"div\.(full|approx)\.f32", ptx)),
        "ptx": ptx,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="90,100", help="comma-separated SM versions (default 90,100)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--out", help="write each variant's PTX into this folder")
    args = ap.parse_args(argv)
    results = []
    for arch in (int(a) for a in args.targets.split(",")):
        for name, kernel, sig, const in [*quant_variants(), *dequant_variants(), *nvfp4_variants()]:
            r = {"kernel": name, **compile_one(kernel, sig, const, arch)}
            if args.out:
                os.makedirs(args.out, exist_ok=True)
                fname = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{name}.sm{arch}.ptx")
                with open(os.path.join(args.out, fname), "w") as f:
                    f.write(r["ptx"])
            del r["ptx"]
            results.append(r)
    if args.json:
        json.dump(results, sys.stdout, indent=1)
        print()
    else:
        print(f"{'kernel':60} {'sm':>4} {'regs':>5} {'spill B':>7} {'smem':>6} {'warps':>5} satfinite ieee_div")
        for r in results:
            print(f"{r['kernel']:60} {r['arch']:>4} {r['registers']:>5} {r['spill_stack_bytes']:>7} "
                  f"{r['shared_bytes']:>6} {r['num_warps']:>5} {str(r['satfinite_e4m3_cast']):>9} "
                  f"{str(r['ieee_div']):>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
