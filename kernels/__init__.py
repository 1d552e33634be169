"""fp8norm's Triton kernels, imported as `fp8norm.kernels` (never as a top-level `kernels`).

Each kernel has a pure-torch twin with the same signature in `fp8norm.reference`. Without CUDA the
kernels run under the Triton interpreter: TRITON_INTERPRET=1 is set here unless already set, and must
be set before triton decorates them (i.e. before this package is first imported).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .dequant_fp8_block import dequant_fp8_block, dequant_fp8_block_kernel  # noqa: E402
from .quant_fp8_block import quant_fp8_block, quant_fp8_block_kernel  # noqa: E402
from .quant_nvfp4 import dequant_nvfp4, dequant_nvfp4_kernel, nvfp4_amax, quant_nvfp4, quant_nvfp4_kernel  # noqa: E402
from .quant_fp8_channel import dequant_fp8_channel, quant_fp8_channel  # noqa: E402
from .quant_mx import dequant_mx, quant_mx  # noqa: E402

__all__ = ["quant_fp8_block", "dequant_fp8_block", "quant_fp8_block_kernel", "dequant_fp8_block_kernel",
           "quant_nvfp4", "dequant_nvfp4", "nvfp4_amax", "quant_nvfp4_kernel", "dequant_nvfp4_kernel",
           "quant_fp8_channel", "dequant_fp8_channel", "quant_mx", "dequant_mx"]
