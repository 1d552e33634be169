"""FP8 with one scale per output row (compressed-tensors FP8_DYNAMIC, `float-quantized`, strategy
channel). Rules: fp8norm.kernels.numerics.fp8_channel; kernel: fp8norm.kernels.quant_fp8_channel."""

from . import Format, _rules

FORMAT = Format(
    name="fp8-channel", summary="FP8, one scale per row (compressed-tensors FP8_DYNAMIC)",
    element="e4m3", scale_block=(1, None), elements_per_byte=1, layout="compressed-tensors",
    from_bf16=("quantize", "--to", "fp8-channel"), from_fp8=("convert", "--to", "fp8-channel"),
    floor_sqnr_db=31.5, readers=("compressed-tensors", "transformers"), config_rules=(_rules.compressed_tensors,),
)
