"""The rules the readers apply when they parse a quantization_config, transcribed from their source
(vLLM 0.32 `vllm/model_executor/layers/quantization/`, transformers 5.25
`transformers/utils/quantization_config.py`), each with the lines it comes from. A rule returns the
problems it finds (strings); an empty list means the reader accepts the config."""

from __future__ import annotations


def _qc(config: dict) -> dict:
    return config.get("quantization_config") or {}


def hf_fp8(config: dict) -> list[str]:
    """vLLM fp8.py Fp8Config.from_config (l.158-175) and __init__ (l.95-133); transformers
    FineGrainedFP8Config.post_init (l.1729-1743)."""
    qc, problems = _qc(config), []
    if "fp8" not in str(qc.get("quant_method", "")):  # vLLM l.160: is_checkpoint_fp8_serialized, else ValueError l.106
        problems.append(f"quant_method {qc.get('quant_method')!r} does not contain 'fp8'")
    scheme = qc.get("activation_scheme")
    if scheme not in ("static", "dynamic"):  # vLLM l.114 (ACTIVATION_SCHEMES), transformers l.1734
        problems.append(f"activation_scheme {scheme!r} is not static or dynamic")
    block = qc.get("weight_block_size")
    if block is not None:
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            problems.append(f"weight_block_size {block!r} is not two positive ints")  # vLLM l.123, transformers l.1736-1739
        if scheme != "dynamic":  # vLLM l.128
            problems.append("block-wise FP8 needs activation_scheme dynamic")
    if qc.get("scale_fmt", "float") not in ("float", "ue8m0"):  # transformers l.1740
        problems.append(f"scale_fmt {qc.get('scale_fmt')!r} is not float or ue8m0")
    skipped = qc.get("ignored_layers") or qc.get("modules_to_not_convert")  # vLLM l.162-168
    if skipped is not None and not isinstance(skipped, list):
        problems.append("the kept modules (modules_to_not_convert / ignored_layers) are not a list")
    return problems


def compressed_tensors(config: dict) -> list[str]:
    """vLLM compressed_tensors.py CompressedTensorsConfig.from_config (l.235-270): config_groups, each with
    targets and weights, format, ignore."""
    qc, problems = _qc(config), []
    if qc.get("quant_method") != "compressed-tensors":
        problems.append(f"quant_method {qc.get('quant_method')!r} is not compressed-tensors")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        problems.append("no config_groups")
        return problems
    for name, group in groups.items():
        if not isinstance(group.get("targets"), list) or not group["targets"]:
            problems.append(f"config_groups.{name}: no targets")  # vLLM l.244 reads v["targets"]
        if not isinstance(group.get("weights"), dict):
            problems.append(f"config_groups.{name}: no weights arguments")
    if not isinstance(qc.get("format"), str):  # vLLM l.255
        problems.append("no format")
    if not isinstance(qc.get("ignore", []), list):  # vLLM l.254
        problems.append("ignore is not a list")
    return problems


def no_quantization(config: dict) -> list[str]:
    """A dense checkpoint: any quantization_config would make the readers expect quantized tensors."""
    return ["a quantization_config is present"] if "quantization_config" in config else []
