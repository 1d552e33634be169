"""OCP MXFP4: E2M1 elements packed two a byte, `weight_packed` uint8 [N, K/2], `weight_scale` uint8
E8M0 [N, K/32] (compressed-tensors `mxfp4-pack-quantized`). Rules: fp8norm.kernels.numerics.mx and
e2m1; kernel: fp8norm.kernels.quant_mx."""

from . import _rules
from .mx import Mx

FORMAT = Mx(
    name="mxfp4", summary="OCP MXFP4, E8M0 scale per 32 (compressed-tensors)",
    element="e2m1", scale_block=(1, 32), elements_per_byte=2, layout="compressed-tensors",
    from_bf16=("quantize", "--to", "mxfp4"), from_fp8=("convert", "--to", "mxfp4"),
    floor_sqnr_db=18.9, readers=("compressed-tensors",), config_rules=(_rules.compressed_tensors,),
    detect_order=20, scale_suffix="_scale", verify_key="mxfp4", weight_label="MXFP4",
    verify_bands=(0.114, 13.9, 6.5), ct_format="mxfp4-pack-quantized", weight_dtype="U8",
)
