"""Pure-torch twins of the Triton kernels in fp8norm.kernels: same signatures, same bits.

Used on CPU, as the kernels' test oracle and as the fallback. They walk the tensor in chunks of
whole row blocks (about CHUNK_ELEMS elements), so working memory stays bounded and cache-resident
whatever the tensor size, and they write straight into the preallocated outputs (`common`). One
module per format; this package only gathers them.
"""

from .common import CHUNK_ELEMS, e4m3_to_float32
from .fp8_block import dequant_fp8_block, quant_fp8_block
from .fp8_channel import dequant_fp8_channel, quant_fp8_channel
from .int4 import dequant_int4, quant_int4
from .mx import dequant_mx, quant_mx
from .nvfp4 import dequant_nvfp4, nvfp4_amax, quant_nvfp4

__all__ = ["quant_fp8_block", "dequant_fp8_block", "CHUNK_ELEMS", "e4m3_to_float32", "quant_nvfp4",
           "dequant_nvfp4", "nvfp4_amax", "quant_fp8_channel", "dequant_fp8_channel", "quant_mx", "dequant_mx",
           "quant_int4", "dequant_int4"]
