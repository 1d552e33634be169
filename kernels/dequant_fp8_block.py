"""Block FP8 dequantization: `out = q * scale_inv` per tile, cast to bf16/fp16/fp32.

Twin: fp8norm.reference.dequant_fp8_block.
"""

from __future__ import annotations

import torch
import triton.language as tl

from .numerics import fp8_block as nx
from .numerics.args import check_dequant_args

from ._launch import LAUNCH_OPTIONS, as_3d, kernel
from ._device import cast_rne, load_e4m3_as_f32, tile_coords
from .quant_fp8_block import check_pow2_block

# 4 warps: 128 elements a thread (8 128-bit fp8 loads), 56 registers, 9 blocks per SM on sm_90, 5.5
# instructions per element (8 warps: 6.1; 16: 7.3). `python tools/aot_compile.py --sweep-warps 2,4,8,16`.
NUM_WARPS = 4


@kernel
def dequant_fp8_block_kernel(
    q_ptr, s_ptr, out_ptr,
    M, N,
    stride_qe, stride_qm, stride_qn,
    stride_oe, stride_om,
    stride_se, stride_sm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid_e, pid_m, pid_n, rows, cols, mask = tile_coords(M, N, BLOCK_M, BLOCK_N)
    q_offs = pid_e * stride_qe + rows[:, None] * stride_qm + cols[None, :] * stride_qn
    q = load_e4m3_as_f32(q_ptr + q_offs, mask, INTERPRET)
    sf = tl.load(s_ptr + pid_e * stride_se + pid_m * stride_sm + pid_n)
    out = cast_rne(q * sf, out_ptr.dtype.element_ty, INTERPRET)
    tl.store(out_ptr + pid_e * stride_oe + rows[:, None] * stride_om + cols[None, :], out, mask=mask)


def dequant_fp8_block(
    q: torch.Tensor,
    scale_inv: torch.Tensor,
    *,
    block_size=nx.DEFAULT_BLOCK_SIZE,
    out_dtype: torch.dtype = torch.bfloat16,
    num_warps: int = NUM_WARPS,
) -> torch.Tensor:
    """`q * scale_inv` per tile for [M, N] or [E, M, N]; scale_inv may be fp32, bf16 or e8m0."""
    (bm, bn), sf = check_dequant_args(q, scale_inv, block_size, out_dtype)
    check_pow2_block((bm, bn))
    out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    if q.numel():
        q3, o3, s3 = as_3d(q), as_3d(out), as_3d(sf)
        grid = (s3.shape[2], s3.shape[1], q3.shape[0])
        dequant_fp8_block_kernel[grid](
            q3, s3, o3,
            q3.shape[1], q3.shape[2],
            q3.stride(0), q3.stride(1), q3.stride(2),
            o3.stride(0), o3.stride(1),
            s3.stride(0), s3.stride(1),
            BLOCK_M=bm, BLOCK_N=bn,
            num_warps=num_warps,
            **LAUNCH_OPTIONS,
        )
    return out
