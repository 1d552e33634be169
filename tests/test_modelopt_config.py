"""`convert --to nvfp4` declares what vLLM serves: weight-only NVFP4 (W4A16_NVFP4: the files hold no
`input_scale`), with every kept linear (lm_head included) excluded, in both places vLLM reads a
ModelOpt config. The rules below are transcribed from vLLM's
vllm/model_executor/layers/quantization/modelopt.py (commit 00155cdecca722d98e34234c3d172725b7720b7d)
and quant_utils.is_layer_skipped; no vLLM is installed here."""

import fnmatch
import json

import pytest
import torch
from safetensors.torch import save_file

from fp8norm.examples import make_example
from tests.ckpt_utils import cli

# modelopt.py, QUANT_ALGOS: the algorithms ModelOptQuantConfigBase.from_config accepts; and
# ModelOptNvFp4Config.__init__: "NVFP4" -> ModelOptNvFp4LinearMethod (W4A4: registers `input_scale` and
# quantizes activations with it), "W4A16_NVFP4" -> ModelOptNvFp4W4A16LinearMethod (Marlin, no input scale)
VLLM_QUANT_ALGOS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "NVFP4", "W4A16_NVFP4", "MXFP8", "MIXED_PRECISION")
WEIGHT_ONLY_NVFP4 = "W4A16_NVFP4"
# quant_utils.FUSED_LAYER_NAME_MAPPING: the fused linears vLLM builds from the checkpoint's q/k/v, gate/up
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def vllm_exclusions(config_json: dict, hf_quant_config: dict | None) -> tuple[str, int, list[str]]:
    """ModelOptQuantConfigBase.from_config on either form: (quant_algo upper-cased, group_size, exclusions).
    hf_quant_config.json: {"quantization": {"quant_algo", "group_size", "exclude_modules", ...}}, and
    ModelOptNvFp4Config._from_config requires group_size, kv_cache_quant_algo and exclude_modules there;
    config.json's flat quantization_config: {"quant_method": "modelopt", "quant_algo", "group_size",
    "ignore"} ("ignore" is the key in config.json; `exclude_modules` there is not read)."""
    if hf_quant_config is not None:
        q = hf_quant_config["quantization"]
        assert {"group_size", "kv_cache_quant_algo", "exclude_modules"} <= set(q)
        return q["quant_algo"].upper(), q["group_size"], q["exclude_modules"]
    assert config_json["quant_method"].lower().startswith("modelopt")  # _extract_modelopt_quant_algo
    return config_json["quant_algo"].upper(), config_json["group_size"], config_json.get("ignore", [])


def excluded(prefix: str, exclude: list[str]) -> bool:
    """ModelOptQuantConfigBase.is_layer_excluded: exact (fused layers: all their shards listed, else
    none: mixed raises), then substring (`e in prefix`), then fnmatch wildcards."""
    proj = prefix.split(".")[-1]
    if proj in FUSED:  # quant_utils.is_layer_skipped
        shards = {prefix.replace(proj, s) in exclude for s in FUSED[proj]}
        assert len(shards) == 1, f"vLLM raises: some but not all shards of {prefix} are excluded"
        if shards == {True}:
            return True
    elif prefix in exclude:
        return True
    for e in exclude:
        if e != prefix and (e in prefix or (prefix.startswith("language_model.")
                                            and e in prefix.removeprefix("language_model."))):
            return True
    return any(fnmatch.fnmatch(prefix, e) for e in exclude)


def vllm_prefixes(module: str) -> list[str]:
    """The layer prefixes vLLM builds for a checkpoint module: itself, its fused linear (q/k/v ->
    qkv_proj, gate/up -> gate_up_proj), and for fused 3D experts the FusedMoE layer (`...experts`)."""
    out = [module]
    head, _, proj = module.rpartition(".")
    out += [f"{head}.{fused}" for fused, shards in FUSED.items() if proj in shards]
    if proj in ("gate_up_proj", "down_proj") and head.endswith(".experts"):
        out.append(head)
    return out


def check_declaration(dst, kept_linears: list[str], quantized: list[str]):
    """Both forms parse as weight-only NVFP4 with group 16; every kept linear and lm_head excluded, no
    quantized module (or the layer vLLM fuses it into) excluded."""
    cfg = json.loads((dst / "config.json").read_text())["quantization_config"]
    hq = json.loads((dst / "hf_quant_config.json").read_text())
    assert hq["producer"]["name"] == "modelopt"
    for form in (vllm_exclusions(cfg, None), vllm_exclusions(cfg, hq)):
        algo, group, exclude = form
        assert algo in VLLM_QUANT_ALGOS and algo == WEIGHT_ONLY_NVFP4 and group == 16
        # ModelOptNvFp4Config.override_quantization_method: "NVFP4" in algo -> modelopt_fp4
        assert "NVFP4" in algo
        for m in kept_linears + ["lm_head"]:
            assert excluded(m, exclude), m
        for m in quantized:
            for p in vllm_prefixes(m):
                assert not excluded(p, exclude), (p, exclude)
    assert "exclude_modules" not in cfg  # the flat form's key is `ignore`


def weights(dst) -> dict[str, tuple[str, tuple]]:
    from fp8norm.checkpoint import open_checkpoint

    return {n: (i.dtype, tuple(i.shape)) for n, i in open_checkpoint(dst).tensors.items()}


@pytest.mark.parametrize("family", ["qwen3.5-moe", "qwen3-moe"])
def test_modelopt_nvfp4_declares_what_vllm_serves(tmp_path, family):
    src = make_example(tmp_path / "bf16", family, "sharded")
    cli("convert", src, tmp_path / "o", "--to", "nvfp4", "--skip-verify")
    out = weights(tmp_path / "o")
    quantized = [n.removesuffix(".weight") for n in out if n + "_scale_2" in out]
    kept = [n.removesuffix(".weight") for n, (dtype, shape) in out.items()
            if n.endswith(".weight") and dtype == "BF16" and len(shape) == 2]
    assert quantized and kept
    check_declaration(tmp_path / "o", kept, quantized)
    assert not [n for n in out if n.endswith("input_scale")]  # weight-only: nothing for W4A4 to read


def test_a_kept_name_inside_a_quantized_one_is_excluded_alone(tmp_path):
    """vLLM also excludes by substring: a kept router `mlp.gate` would exclude `mlp.gate_up_proj` (the
    quantized gate/up, fused) and its load would fail. It is written as a wildcard matching itself only."""
    g = torch.Generator().manual_seed(0)
    p = "model.layers.0.mlp"
    t = {f"{p}.gate.weight": torch.randn(4, 64, generator=g).bfloat16(),
         f"{p}.gate_proj.weight": torch.randn(128, 64, generator=g).bfloat16(),
         f"{p}.up_proj.weight": torch.randn(128, 64, generator=g).bfloat16(),
         f"{p}.down_proj.weight": torch.randn(64, 128, generator=g).bfloat16()}
    (tmp_path / "src").mkdir()
    save_file(t, str(tmp_path / "src" / "model.safetensors"))
    (tmp_path / "src" / "config.json").write_text("{}")
    cli("convert", tmp_path / "src", tmp_path / "o", "--to", "nvfp4", "--skip-verify")
    out = weights(tmp_path / "o")
    assert out[f"{p}.gate.weight"][0] == "BF16" and out[f"{p}.gate_proj.weight"][0] == "U8"
    check_declaration(tmp_path / "o", [f"{p}.gate"], [f"{p}.gate_proj", f"{p}.up_proj", f"{p}.down_proj"])
    hq = json.loads((tmp_path / "o" / "hf_quant_config.json").read_text())
    assert hq["quantization"]["exclude_modules"] == ["lm_head", f"{p}.gat[e]"]
