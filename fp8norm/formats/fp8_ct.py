"""Block FP8 in the compressed-tensors layout: the same e4m3 bytes and 128x128 scales as `fp8`, named
`weight_scale`, with a compressed-tensors `float-quantized` block config."""

from dataclasses import dataclass

from . import _rules, compressed_tensors as ct
from .fp8_block import BlockFp8


@dataclass(frozen=True)
class CtBlockFp8(BlockFp8):
    def detect(self, config, tensors):
        """Any compressed-tensors config no other format claimed: block FP8, or one line saying so."""
        qc = ct.quantization_config_of(config)
        if not qc:
            return None
        w = ct.weight_args(qc)
        if w.get("strategy") != "block" or w.get("num_bits") != 8:
            raise ValueError(f"compressed-tensors source with weights {w}: only FP8 block is read here")
        return w.get("block_structure") or self.scale_block

    def refuse_source(self, src, source):
        return None

    def quantization_config(self, plan):
        bm, bn = plan.source_format.block_size
        weights = {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [bm, bn],
                   "symmetric": True, "dynamic": False}
        acts = {"num_bits": 8, "type": "float", "strategy": "group", "group_size": bn, "symmetric": True,
                "dynamic": True}
        return ct.ct_config("float-quantized", weights, acts, plan)


FORMAT = CtBlockFp8(
    name="fp8-ct", summary="block FP8 in the compressed-tensors layout",
    element="e4m3", scale_block=(128, 128), elements_per_byte=1, layout="compressed-tensors",
    from_bf16=None, from_fp8=("convert", "--to", "fp8-ct"),  # a relabelling of block FP8
    floor_sqnr_db=31.5, readers=("compressed-tensors",), config_rules=(_rules.compressed_tensors,),
    detect_order=30, scale_suffix="_scale",
)
