"""Model-parallel layouts: one file per rank, written in one streaming pass on the output engine.

    jobs      SliceOut / shard_job: what a layout plans (sources -> rank-file tensors), and its execution
    fp8       the cut / join / requantize engine both layouts use, for plain and scaled weights
    deepseek  `model{i}-mp{N}.safetensors` for DeepSeek's reference inference code
    mcore     Megatron-Core TP/PP/EP rank folders, and back to Hugging Face layout
"""

from .deepseek import plan_deepseek, shard_deepseek
from .mcore import hf_to_mcore, mcore_to_hf, plan_mcore, plan_mcore_to_hf

__all__ = ["shard_deepseek", "plan_deepseek", "hf_to_mcore", "mcore_to_hf", "plan_mcore", "plan_mcore_to_hf"]
