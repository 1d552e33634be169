"""`quantize --scheme fp8-channel|mxfp8|mxfp4` and `convert --to` them: compressed-tensors layouts read
back by compressed-tensors' own dequantizer, transformers, and `convert --to bf16`."""

import json

import pytest
import torch

from fp8norm import reference
from fp8norm.examples import make_example
from tests.ckpt_utils import cli, read_dir, same_bytes, save_tiny_qwen3
from tests.readers import reader

SCHEMES = ["fp8-channel", "mxfp8", "mxfp4"]


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """The Qwen3.5-MoE-style example: fused 3D experts, vision tower, MTP, ragged shapes."""
    root = tmp_path_factory.mktemp("schemes")
    return make_example(root / "bf16", "qwen3.5-moe", "sharded")


def ours_dequant(scheme, out, module, dtype=torch.float32):
    if scheme == "fp8-channel":
        return reference.dequant_fp8_channel(out[module + ".weight"], out[module + ".weight_scale"], out_dtype=dtype)
    stored = out[module + (".weight" if scheme == "mxfp8" else ".weight_packed")]
    return reference.dequant_mx(stored, out[module + ".weight_scale"], fmt=scheme, out_dtype=dtype)


def src_weight(src, module):
    """The source weight of a (possibly per-expert) module: `experts.{e}.gate_proj` is the first half of
    the rows of expert e of the fused `experts.gate_up_proj`, up_proj the second."""
    if module + ".weight" in src:
        return src[module + ".weight"]
    prefix, e, proj = module.rsplit(".", 2)
    if proj == "down_proj":
        return src[prefix + ".down_proj"][int(e)]
    return src[prefix + ".gate_up_proj"][int(e)].chunk(2)[proj == "up_proj"]


def quantized_modules(out):
    return sorted(k.removesuffix(".weight_scale") for k in out if k.endswith(".weight_scale"))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_scheme_is_read_by_compressed_tensors(moe, tmp_path, scheme):
    ct = reader("compressed_tensors")
    from compressed_tensors.entrypoints.convert import CompressedTensorsDequantizer

    res = cli("quantize", moe, tmp_path / "q", "--to", scheme, "--max-shard-size", "2MB")
    assert "quantized" in res.output
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    ct.quantization.QuantizationConfig.model_validate(qc)
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    out = read_dir(tmp_path / "q")
    src = read_dir(moe)
    modules = quantized_modules(out)
    # the 2D linears the rule table quantizes, and the fused 3D experts of 2 layers and the MTP block
    # written per expert (4 experts x gate/up/down): compressed-tensors has no fused 3D layout
    assert len(modules) == 17 + 3 * 4 * 3
    assert "model.language_model.layers.1.mlp.experts.gate_up_proj" not in out
    dtype = torch.bfloat16 if scheme == "mxfp4" else torch.float32  # CT decompresses FP4 in bf16
    theirs = CompressedTensorsDequantizer(tmp_path / "q", dtype=dtype).validate(dict(out))
    for m in modules:
        assert torch.equal(theirs[m + ".weight"], ours_dequant(scheme, out, m, dtype)), m
        # and each weight is the twin's quantization of the source (experts: a slice of the fused tensor)
        x = src_weight(src, m)
        mine = reference.quant_fp8_channel(x, scale_dtype=torch.bfloat16) \
            if scheme == "fp8-channel" else reference.quant_mx(x, fmt=scheme)
        assert same_bytes(out[m + (".weight_packed" if scheme == "mxfp4" else ".weight")], mine[0])
        assert same_bytes(out[m + ".weight_scale"], mine[1].float() if scheme == "fp8-channel" else mine[1])
    if scheme == "fp8-channel":
        assert out[modules[0] + ".weight_scale"].shape[-1] == 1


@pytest.mark.parametrize("scheme", SCHEMES)
def test_convert_to_bf16_reads_them_back(moe, tmp_path, scheme):
    cli("quantize", moe, tmp_path / "q", "--to", scheme, "--skip-verify")
    res = cli("convert", tmp_path / "q", tmp_path / "b", "--to", "bf16")
    assert f"{17 + 36} dequantized" in res.output
    out, back, src = read_dir(tmp_path / "q"), read_dir(tmp_path / "b"), read_dir(moe)
    modules = quantized_modules(out)
    assert back.keys() == {k for k in src if not k.endswith("_proj")} | {m + ".weight" for m in modules} | \
        {k for k in src if k.endswith("_proj") and "experts" not in k}
    for m in modules:
        assert torch.equal(back[m + ".weight"], ours_dequant(scheme, out, m, torch.bfloat16)), m
    assert "quantization_config" not in json.loads((tmp_path / "b" / "config.json").read_text())


@pytest.mark.parametrize("scheme", ["fp8-channel", "mxfp4"])
def test_convert_from_block_fp8_dequantizes_in_the_same_pass(moe, tmp_path, scheme):
    cli("quantize", moe, tmp_path / "fp8", "--skip-verify")
    cli("convert", tmp_path / "fp8", tmp_path / "o", "--to", scheme)
    fp8, out = read_dir(tmp_path / "fp8"), read_dir(tmp_path / "o")

    def quant(name):
        q, s = fp8[name], fp8[name + "_scale_inv"]
        return reference.quant_fp8_channel(q, src_scale_inv=s, scale_dtype=torch.bfloat16)[1].float() \
            if scheme == "fp8-channel" else reference.quant_mx(q, fmt=scheme, src_scale_inv=s)[1]

    modules = quantized_modules(out)
    for m in modules:
        if m + ".weight" in fp8:
            assert same_bytes(out[m + ".weight_scale"], quant(m + ".weight")), m
    # fused 3D FP8 experts: one pass over all experts, split per expert and projection
    prefix = "model.language_model.layers.1.mlp.experts"
    gate_up, down = quant(prefix + ".gate_up_proj"), quant(prefix + ".down_proj")
    for e in range(4):
        assert same_bytes(out[f"{prefix}.{e}.up_proj.weight_scale"], gate_up[e].chunk(2)[1].contiguous())
        assert same_bytes(out[f"{prefix}.{e}.down_proj.weight_scale"], down[e])
    assert len(modules) == 17 + 36


def test_convert_from_bf16_equals_quantize_scheme(moe, tmp_path):
    cli("quantize", moe, tmp_path / "q", "--to", "mxfp8", "--skip-verify")
    cli("convert", moe, tmp_path / "c", "--to", "mxfp8")
    a, b = read_dir(tmp_path / "q"), read_dir(tmp_path / "c")
    assert a.keys() == b.keys() and all(same_bytes(a[k], b[k]) for k in a)


def test_plan_shows_the_scheme_and_mx_keeps_unaligned_with_fused_partners(tmp_path):
    from safetensors.torch import save_file

    src = tmp_path / "src"
    src.mkdir()
    t = {f"model.layers.0.self_attn.{p}.weight": torch.randn(256, 256 if p != "k_proj" else 272).bfloat16()
         for p in ("q_proj", "k_proj", "v_proj")}
    t["model.layers.0.mlp.down_proj.weight"] = torch.randn(256, 256).bfloat16()
    save_file(t, str(src / "model.safetensors"))
    (src / "config.json").write_text("{}")
    res = cli("plan", src, "--to", "mxfp4")
    assert "->mxfp4" in res.output and "mx:unaligned-kept" in res.output and "ct:fused-with-kept" in res.output
    res = cli("plan", src, "--to", "fp8-channel")
    assert res.output.count("->fp8-channel") == 4 and "scheme: fp8-channel" in res.output
    res = cli("quantize", src, tmp_path / "o", "--to", "mxfp8", "--calib", "mse", ok=False)
    assert res.exit_code == 1 and "fp8-block only" in res.output


@pytest.mark.parametrize("scheme", SCHEMES)
def test_transformers_loads_on_cpu(tmp_path, scheme):
    """transformers' compressed-tensors integration loads the output on CPU and its decompressed
    weights equal our dequantization; logits stay close to the bf16 model's."""
    transformers = reader("transformers")
    save_tiny_qwen3(tmp_path / "bf16")
    cli("quantize", tmp_path / "bf16", tmp_path / "q", "--to", scheme)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.bfloat16)
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = base(ids).logits.float(), model(ids).logits.float()
    # 4-bit elements on random Gaussian weights: a looser band for mxfp4
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > (0.95 if scheme == "mxfp4" else 0.99)
    out = read_dir(tmp_path / "q")
    m = "model.layers.1.mlp.down_proj"
    w = dict(model.named_parameters())[m + ".weight"]
    assert torch.equal(w.detach().float(), ours_dequant(scheme, out, m, torch.bfloat16).float())


def test_resume_rewrites_only_missing_shards_and_refuses_another_scheme(moe, tmp_path):
    from tests.ckpt_utils import tree_bytes

    args = ("--to", "mxfp4", "--max-shard-size", "1MB", "--skip-verify", "-q")
    cli("quantize", moe, tmp_path / "o", *args)
    before = tree_bytes(tmp_path / "o")
    shards = sorted((tmp_path / "o").glob("model-*.safetensors"))
    assert len(shards) >= 3
    shards[1].unlink()
    res = cli("quantize", moe, tmp_path / "o", *args, "--resume")
    assert f"1 shard(s) written, {len(shards) - 1} already done" in res.output
    assert tree_bytes(tmp_path / "o") == before
    res = cli("quantize", moe, tmp_path / "o", "--to", "mxfp8", "--max-shard-size", "1MB", "--resume", ok=False)
    assert res.exit_code == 1 and "other settings" in res.output


def test_a_broken_scheme_source_is_one_line_naming_the_scale(moe, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    cli("quantize", moe, tmp_path / "q", "--to", "mxfp8", "--skip-verify", "-q")
    f = next((tmp_path / "q").glob("model-*.safetensors"))
    t = load_file(f)
    name = next(k for k in t if k.endswith(".weight_scale"))
    t[name] = t[name].clone()
    t[name].view(-1)[3] = 255  # E8M0 NaN
    save_file(t, f, metadata={"format": "pt"})
    shutil.rmtree(tmp_path / "b", ignore_errors=True)
    res = cli("convert", tmp_path / "q", tmp_path / "b", "--to", "bf16", ok=False)
    assert res.exit_code == 1 and name in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()
