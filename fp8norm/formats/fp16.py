"""Dense fp16: a quantized checkpoint dequantized to float16 (`convert --to fp16`)."""

from dataclasses import replace

from .bf16 import FORMAT as BF16

FORMAT = replace(BF16, name="fp16", summary="dense fp16 (dequantized)", element="fp16",
                 from_fp8=("convert", "--to", "fp16"), detect_order=None, dense_dtype="F16")
