"""NVFP4 in the compressed-tensors layout (`nvfp4-pack-quantized`): the NVFP4 bytes and scales named
`weight_packed`, `weight_scale`, `weight_global_scale`."""

from . import Format, _rules

FORMAT = Format(
    name="nvfp4-ct", summary="NVFP4, compressed-tensors nvfp4-pack-quantized (Blackwell)",
    element="e2m1", scale_block=(1, 16), elements_per_byte=2, layout="compressed-tensors",
    from_bf16=("convert", "--to", "nvfp4-ct"), from_fp8=("convert", "--to", "nvfp4-ct"),
    floor_sqnr_db=20.5, shard_refusal="NVFP4", readers=("compressed-tensors",),
    config_rules=(_rules.compressed_tensors,),
)
