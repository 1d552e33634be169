"""compressed-tensors configs that scale: `targets: ["Linear"]` plus ignore patterns collapsed over layer
and expert indices, checked with compressed-tensors' own matchers on a DeepSeek-V3-sized module tree
(> 50,000 module names): the same modules are quantized, and matching takes seconds, not hours (one
`re:^exact$` target per module made match_named_modules quadratic: 61 s for 768 linears)."""

import time
from pathlib import Path

import pytest
import torch

from fp8norm.classify import FP8, KEEP
from fp8norm import formats
from fp8norm.plan import Plan, QuantSettings, TensorPlan
from fp8norm.formats.compressed_tensors import ignore_patterns
from tests.readers import reader

N_LAYERS, N_DENSE, N_EXPERTS = 68, 3, 256  # DeepSeek-V3 has 61 layers: ~47,000 linears
ATTN = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def deepseek_names():
    """(quantized linears, kept modules with a `.weight`): MLA attention, dense MLPs in the first layers,
    256 routed + shared experts after; routers, norms, embeddings and lm_head kept."""
    quantized, kept = [], ["model.embed_tokens", "model.norm", "lm_head"]
    for i in range(N_LAYERS):
        p = f"model.layers.{i}"
        quantized += [f"{p}.self_attn.{a}" for a in ATTN]
        kept += [f"{p}.input_layernorm", f"{p}.post_attention_layernorm", f"{p}.self_attn.q_a_layernorm",
                 f"{p}.self_attn.kv_a_layernorm"]
        if i < N_DENSE:
            quantized += [f"{p}.mlp.{m}" for m in MLP]
            continue
        kept.append(f"{p}.mlp.gate")
        quantized += [f"{p}.mlp.shared_experts.{m}" for m in MLP]
        quantized += [f"{p}.mlp.experts.{e}.{m}" for e in range(N_EXPERTS) for m in MLP]
    return quantized, kept


def fake_plan(quantized, kept):
    ts = [TensorPlan(m + ".weight", "BF16", (256, 256), FP8, "test", "x.safetensors", []) for m in quantized]
    ts += [TensorPlan(m + ".weight", "BF16", (256,) if "norm" in m else (256, 256), KEEP, "test", "x.safetensors",
                      []) for m in kept]
    return Plan(Path("."), QuantSettings(), ts, [], True, 0)


def meta_model(linears, others):
    """A module tree on the meta device with nn.Linear at `linears` and LayerNorm/Embedding elsewhere."""
    root = torch.nn.Module()
    with torch.device("meta"):
        for names, make in ((linears, lambda: torch.nn.Linear(1, 1, bias=False)),
                            (others, lambda: torch.nn.LayerNorm(1))):
            for name in names:
                parent = root
                *path, leaf = name.split(".")
                for part in path:
                    if not hasattr(parent, part):
                        parent.add_module(part, torch.nn.Module())
                    parent = getattr(parent, part)
                parent.add_module(leaf, make())
    return root


@pytest.fixture(scope="module")
def deepseek():
    quantized, kept = deepseek_names()
    assert len(quantized) + len(kept) > 50_000
    return quantized, kept, formats.get("fp8-channel").quantization_config(fake_plan(quantized, kept))


def test_config_is_small_and_parses(deepseek):
    ct = reader("compressed_tensors")
    quantized, kept, qc = deepseek
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert len(qc["ignore"]) <= 12, qc["ignore"]
    t = time.perf_counter()
    ct.quantization.QuantizationConfig.model_validate(qc)
    assert time.perf_counter() - t < 5


def test_compressed_tensors_matches_exactly_our_modules_quickly(deepseek, record_property):
    """match_named_modules (what transformers / llm-compressor apply) on the module tree selects
    exactly the quantized linears; routers (`mlp.gate`, Linear too) and lm_head are ignored."""
    reader("compressed_tensors")
    from compressed_tensors.utils.match import match_named_modules

    quantized, kept, qc = deepseek
    routers = [k for k in kept if k.endswith("mlp.gate")] + ["lm_head"]
    model = meta_model(quantized + routers, [k for k in kept if k not in routers])
    t = time.perf_counter()
    matched = [n for n, _ in match_named_modules(model, qc["config_groups"]["group_0"]["targets"], qc["ignore"])]
    elapsed = time.perf_counter() - t
    record_property("match_named_modules_s", f"{elapsed:.2f} for {len(quantized) + len(kept)} modules")
    assert sorted(matched) == sorted(quantized)
    assert elapsed < 120  # measured ~1-2 s (shared, loaded machine)


def test_compressed_tensors_name_based_matcher_agrees(deepseek):
    """The checkpoint-level matcher (compressed-tensors' convert/dequantize entry points) takes every
    `X.weight` not ending in "norm" for a Linear: the ignore list must cover every kept module."""
    reader("compressed_tensors")
    from compressed_tensors.utils.match import match_quantizable_tensors

    quantized, kept, qc = deepseek
    tensors = dict.fromkeys([m + ".weight" for m in quantized + kept])
    matched = [m for m, _ in match_quantizable_tensors(tensors, qc["ignore"], qc["config_groups"]["group_0"]["targets"])]
    assert sorted(matched) == sorted(quantized)


def test_patterns_fall_back_to_exact_names_where_a_pattern_would_catch_a_quantized_module():
    quantized = [f"model.layers.{i}.mlp.down_proj" for i in range(1, 4)] + ["model.layers.0.self_attn.o_proj"]
    kept = ["model.layers.0.mlp.down_proj", "model.layers.7.mlp.down_proj", "visual.blocks.0.attn.qkv",
            "visual.blocks.1.attn.qkv"]
    ign = ignore_patterns(kept, quantized)
    assert ign == sorted(["model.layers.0.mlp.down_proj", "model.layers.7.mlp.down_proj",
                          r"re:^visual\.blocks\.\d+\.attn\.qkv$", "lm_head"])
    assert ignore_patterns(kept, quantized + ["lm_head"])[-1] != "lm_head"
