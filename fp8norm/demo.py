"""A small end-to-end kernel demo: quantize a stacked-expert tensor, dequantize it, compare backends."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels.numerics import fp8_block as nx
from . import reference


@dataclass
class DemoResult:
    shape: tuple[int, ...]
    scale_fmt: str
    backends: tuple[str, ...]
    scale_inv_shape: tuple[int, ...]
    max_rel_error: float  # over values in e4m3's normal range
    bit_exact: bool  # every backend gave the twin's bytes


def kernel_demo(shape=(3, 200, 130), scale_fmt: str = "float", seed: int = 0,
                backends=("torch", "triton")) -> DemoResult:
    """Quantize a random bf16 tensor on each backend; check they agree and the round-trip error bound."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    q_ref, s_ref = reference.quant_fp8_block(x, scale_fmt=scale_fmt)
    bit_exact = True
    for name in backends:
        if name == "torch":
            continue
        import fp8norm.kernels as kernels  # interpreted on CPU tensors, compiled on CUDA ones, per launch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        q, s = kernels.quant_fp8_block(x.to(device), scale_fmt=scale_fmt)
        bit_exact &= torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s.cpu(), s_ref)
    y = reference.dequant_fp8_block(q_ref, s_ref, out_dtype=torch.float32)
    sf = s_ref.repeat_interleave(128, -2).repeat_interleave(128, -1)[..., : shape[-2], : shape[-1]]
    xf = x.float()
    normal = xf.abs() / sf >= 2.0 ** -6
    rel = ((y - xf).abs() / xf.abs())[normal]
    return DemoResult(tuple(shape), scale_fmt, tuple(backends), nx.scale_inv_shape(tuple(shape), (128, 128)),
                      float(rel.max()), bit_exact)
