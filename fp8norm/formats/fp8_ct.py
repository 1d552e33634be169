"""Block FP8 in the compressed-tensors layout: the same e4m3 bytes and 128x128 scales as `fp8`, named
`weight_scale`, with a compressed-tensors `float-quantized` block config."""

from . import Format, _rules

FORMAT = Format(
    name="fp8-ct", summary="block FP8 in the compressed-tensors layout",
    element="e4m3", scale_block=(128, 128), elements_per_byte=1, layout="compressed-tensors",
    from_bf16=None, from_fp8=("convert", "--to", "fp8-ct"),  # a relabelling of block FP8
    floor_sqnr_db=31.5, readers=("compressed-tensors",), config_rules=(_rules.compressed_tensors,),
)
