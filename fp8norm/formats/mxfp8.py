"""OCP MXFP8: `weight` e4m3, `weight_scale` uint8 E8M0 [N, K/32] (compressed-tensors `mxfp8-quantized`).
Rules: fp8norm.kernels.numerics.mx; kernel: fp8norm.kernels.quant_mx."""

from . import _rules
from .mx import Mx

FORMAT = Mx(
    name="mxfp8", summary="OCP MXFP8, E8M0 scale per 32 (compressed-tensors)",
    element="e4m3", scale_block=(1, 32), elements_per_byte=1, layout="compressed-tensors",
    from_bf16=("quantize", "--to", "mxfp8"), from_fp8=("convert", "--to", "mxfp8"),
    floor_sqnr_db=30.7, readers=("compressed-tensors",), config_rules=(_rules.compressed_tensors,),
    detect_order=20, scale_suffix="_scale", verify_key="mxfp8", weight_label="MXFP8",
    verify_bands=(0.0292, 24.6, 18.0), ct_format="mxfp8-quantized",
)
