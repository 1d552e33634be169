"""The calls tools/aot_compile.py compiles: per kernel module of fp8norm.kernels, `{variant name:
zero-argument callable}` invoking the module's public wrapper on CPU tensors of a realistic shape (a
few hundred rows of a real weight's width, so every program is a full tile). Values do not matter: the
tool compiles what the launches would run, it never runs them. A kernel module with no entry in
`CASES` is an error (`aot_cases()`), so a new kernel cannot go uncompiled.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

import fp8norm.kernels as fk
from fp8norm.kernels.numerics import fp8_block as nx
from fp8norm.kernels.numerics import int4, mx

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def specimens() -> SimpleNamespace:
    """A bf16 weight [512, 7168], stacked bf16 experts [4, 512, 2048], an e4m3 weight [512, 7168] and
    its 128x128 block scales."""
    return SimpleNamespace(weight=torch.zeros(512, 7168, dtype=torch.bfloat16),
                           experts=torch.zeros(4, 512, 2048, dtype=torch.bfloat16),
                           fp8=torch.zeros(512, 7168, dtype=torch.float8_e4m3fn),
                           fp8_scale_inv=torch.ones(nx.scale_inv_shape((512, 7168), nx.DEFAULT_BLOCK_SIZE)))


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).split(".")[-1]


def dequant_fp8_block_cases(t) -> dict:
    return {f"dequant_fp8_block[{_dtype_name(dt)}]": (lambda dt=dt: fk.dequant_fp8_block(t.fp8, t.fp8_scale_inv,
                                                                                         out_dtype=dt))
            for dt in DTYPES}


def quant_fp8_block_cases(t) -> dict:
    x, s = t.weight, t.fp8_scale_inv
    cases = {}
    for dt in DTYPES:
        xd = x.to(dt)
        cases[f"quant_fp8_block[{_dtype_name(dt)},float]"] = lambda xd=xd: fk.quant_fp8_block(xd)
        cases[f"quant_fp8_block[{_dtype_name(dt)},ue8m0]"] = lambda xd=xd: fk.quant_fp8_block(xd, scale_fmt="ue8m0")
    cases["quant_fp8_block[bfloat16,ue8m0,e8m0]"] = lambda: fk.quant_fp8_block(
        x, scale_fmt="ue8m0", scale_dtype=torch.float8_e8m0fnu)
    cases["quant_fp8_block[bfloat16,float,bf16-scale]"] = lambda: fk.quant_fp8_block(x, scale_dtype=torch.bfloat16)
    cases["quant_fp8_block[bfloat16,given-scale]"] = lambda: fk.quant_fp8_block(x, scale_inv=s)
    cases["quant_fp8_block[e4m3,requant-ue8m0]"] = lambda: fk.quant_fp8_block(t.fp8, x_scale_inv=s,
                                                                               scale_fmt="ue8m0")
    return cases


def quant_fp8_channel_cases(t) -> dict:
    w, experts, fp8, fp8_scale = t.weight, t.experts, t.fp8, t.fp8_scale_inv
    return {
        "quant_fp8_channel[bf16]": lambda: fk.quant_fp8_channel(w),
        "quant_fp8_channel[bf16,ue8m0]": lambda: fk.quant_fp8_channel(w, scale_fmt="ue8m0"),
        "quant_fp8_channel[bf16,scale=bf16]": lambda: fk.quant_fp8_channel(w, scale_dtype=torch.bfloat16),
        "quant_fp8_channel[bf16,3d]": lambda: fk.quant_fp8_channel(experts),
        "quant_fp8_channel[fp8,src=fp32]": lambda: fk.quant_fp8_channel(fp8, src_scale_inv=fp8_scale),
        "dequant_fp8_channel[bf16]": lambda: fk.dequant_fp8_channel(fp8, torch.ones(512, 1)),
    }


def quant_int4_cases(t) -> dict:
    w, experts = t.weight, t.experts
    packed = torch.zeros(512, 7168 // int4.PER_WORD, dtype=torch.int32)
    scale = torch.ones(512, 7168 // int4.GROUP_SIZE, dtype=torch.bfloat16)
    return {
        "quant_int4[bfloat16]": lambda: fk.quant_int4(w),
        "quant_int4[bfloat16,ct-cpu]": lambda: fk.quant_int4(w, rule="ct-cpu"),
        "quant_int4[float32]": lambda: fk.quant_int4(w.float()),
        "quant_int4[bfloat16,3d]": lambda: fk.quant_int4(experts),
        "dequant_int4[bfloat16]": lambda: fk.dequant_int4(packed, scale),
    }


def quant_mx_cases(t) -> dict:
    w, experts, fp8, fp8_scale = t.weight, t.experts, t.fp8, t.fp8_scale_inv
    e8 = torch.full((512, 7168 // mx.MX_BLOCK), 127, dtype=torch.uint8)
    packed = torch.zeros(512, 7168 // 2, dtype=torch.uint8)
    return {
        "quant_mx[mxfp8,bf16]": lambda: fk.quant_mx(w, fmt="mxfp8"),
        "quant_mx[mxfp4,bf16]": lambda: fk.quant_mx(w, fmt="mxfp4"),
        "quant_mx[mxfp8,bf16,ct]": lambda: fk.quant_mx(w, fmt="mxfp8", rule="ct"),
        "quant_mx[mxfp8,bf16,ocp]": lambda: fk.quant_mx(w, fmt="mxfp8", rule="ocp"),
        "quant_mx[mxfp4,bf16,3d]": lambda: fk.quant_mx(experts, fmt="mxfp4"),
        "quant_mx[mxfp8,fp8,src=fp32]": lambda: fk.quant_mx(fp8, fmt="mxfp8", src_scale_inv=fp8_scale),
        "quant_mx[mxfp4,fp8,src=fp32]": lambda: fk.quant_mx(fp8, fmt="mxfp4", src_scale_inv=fp8_scale),
        "dequant_mx[mxfp8,bf16]": lambda: fk.dequant_mx(fp8, e8, fmt="mxfp8"),
        "dequant_mx[mxfp4,bf16]": lambda: fk.dequant_mx(packed, e8, fmt="mxfp4"),
    }


def quant_nvfp4_cases(t) -> dict:
    p = torch.zeros(512, 7168 // 2, dtype=torch.uint8)
    w = torch.ones(512, 7168 // 16).to(torch.float8_e4m3fn)
    return {
        "quant_nvfp4[bfloat16]": lambda: fk.quant_nvfp4(t.weight),  # also compiles nvfp4_amax_kernel
        "quant_nvfp4[e4m3,src=fp32]": lambda: fk.quant_nvfp4(t.fp8, src_scale_inv=t.fp8_scale_inv),
        "dequant_nvfp4[bfloat16]": lambda: fk.dequant_nvfp4(p, w, torch.tensor(1.0)),
    }


# kernel module (fp8norm.kernels.NAME) -> its cases
CASES = {"dequant_fp8_block": dequant_fp8_block_cases, "quant_fp8_block": quant_fp8_block_cases,
         "quant_fp8_channel": quant_fp8_channel_cases, "quant_int4": quant_int4_cases, "quant_mx": quant_mx_cases,
         "quant_nvfp4": quant_nvfp4_cases}


def aot_cases() -> dict:
    """Every kernel module's cases, merged; a kernel module with none is an error."""
    t = specimens()
    cases = {}
    for module in fk.kernel_modules():
        name = module.__name__.rsplit(".", 1)[-1]
        if name not in CASES:
            raise LookupError(f"{module.__name__} has no cases in tools/kernel_cases.py (CASES): add its "
                              "public wrappers' calls there")
        cases.update(CASES[name](t))
    return cases
