"""OCP MXFP8: e4m3 elements, one E8M0 scale per 32 along the row (compressed-tensors `mxfp8-quantized`).
Rules: fp8norm.kernels.numerics.mx; kernel: fp8norm.kernels.quant_mx."""

from . import Format, _rules

FORMAT = Format(
    name="mxfp8", summary="OCP MXFP8, E8M0 scale per 32 (compressed-tensors)",
    element="e4m3", scale_block=(1, 32), elements_per_byte=1, layout="compressed-tensors",
    from_bf16=("quantize", "--to", "mxfp8"), from_fp8=("convert", "--to", "mxfp8"),
    floor_sqnr_db=30.7, readers=("compressed-tensors",), config_rules=(_rules.compressed_tensors,),
)
