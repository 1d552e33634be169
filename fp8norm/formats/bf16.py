"""Dense bf16: what a quantized checkpoint dequantizes back to (`convert --to bf16`); no
quantization_config. `fp16` is the same with float16 weights. As a source it is the unquantized
checkpoint `quantize` and `convert` round."""

from dataclasses import dataclass

from . import Format, _rules


@dataclass(frozen=True)
class Dense(Format):
    def detect(self, config, tensors):
        from ..kernels.numerics import fp8_block as nx

        return nx.DEFAULT_BLOCK_SIZE  # the last asked: whatever holds no quantized weights

    def convert_decision(self, name, info, scale, candidate, source):
        from ..classify import Decision

        return (Decision.DEQUANT, f"{source.rule_label}->{self.name}") if scale else None


FORMAT = Dense(
    name="bf16", summary="dense bf16 (dequantized)",
    element="bf16", scale_block=(), elements_per_byte=1, layout="dense",
    from_bf16=None, from_fp8=("convert", "--to", "bf16"),  # bf16 is a source itself
    floor_sqnr_db=None, readers=("transformers",), config_rules=(_rules.no_quantization,),
    detect_order=50, source_kind="unquantized", dense_dtype="BF16",
)
