"""`fp8norm convert`: dequantize, ue8m0, compressed-tensors FP8 and back, read by independent readers."""

import json

import pytest
import torch
from click.testing import CliRunner

from fp8norm import numerics as nx
from fp8norm import reference
from fp8norm.cli import main
from fp8norm.examples import make_example
from tests.ckpt_utils import read_dir, same_bytes, tree_bytes


def cli(*args, ok=True):
    res = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, res.output + repr(res.exception)
    return res


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    """bf16 example (fused 3D experts, ragged shapes) and its float-scaled FP8 quantization."""
    root = tmp_path_factory.mktemp("conv")
    src = make_example(root / "bf16", "qwen3.5-moe", "sharded")
    cli("quantize", src, root / "fp8", "--max-shard-size", "2MB", "--skip-verify")
    return src, root / "fp8"


def fp8_weights(tensors):
    return [n for n in tensors if n + "_scale_inv" in tensors]


def test_to_bf16_dequantizes_and_keeps_the_rest(fp8_ckpt, tmp_path):
    bf16, fp8 = fp8_ckpt
    res = cli("convert", fp8, tmp_path / "o", "--to", "bf16")
    assert "23 dequantized" in res.output
    q, out, src = read_dir(fp8), read_dir(tmp_path / "o"), read_dir(bf16)
    assert set(out) == set(src)
    for n, t in q.items():
        if n.endswith("_scale_inv"):
            continue
        if n in fp8_weights(q):
            ref = reference.dequant_fp8_block(t, q[n + "_scale_inv"], out_dtype=torch.bfloat16)
            assert same_bytes(out[n], ref), n
            # bf16 -> fp8 -> bf16 stays within the FP8 bound of the original
            err = (out[n].float() - src[n].float()).abs()
            sf = q[n + "_scale_inv"].repeat_interleave(128, -2).repeat_interleave(128, -1)[..., :t.shape[-2], :t.shape[-1]]
            assert (err <= 2.0 ** -4 * src[n].float().abs() + 2.0 ** -9 * sf + 2.0 ** -8 * src[n].float().abs()).all()
        else:
            assert same_bytes(out[n], t), n
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert json.loads((tmp_path / "o" / "fp8norm.json").read_text())["converted_to"] == "bf16"
    assert (tmp_path / "o" / "tokenizer.json").read_bytes() == (fp8 / "tokenizer.json").read_bytes()


def test_to_ue8m0_relabels_pow2_scales(fp8_ckpt, tmp_path):
    bf16, _ = fp8_ckpt
    cli("quantize", bf16, tmp_path / "pow2", "--scale-fmt", "ue8m0", "--skip-verify")
    cfg = json.loads((tmp_path / "pow2" / "config.json").read_text())
    del cfg["quantization_config"]["scale_fmt"]  # an FP8 checkpoint with pow2 scales but no claim of it
    (tmp_path / "pow2" / "config.json").write_text(json.dumps(cfg))
    res = cli("convert", tmp_path / "pow2", tmp_path / "o", "--to", "fp8-ue8m0")
    assert "requant" not in res.output  # nothing requantized
    a, b = read_dir(tmp_path / "pow2"), read_dir(tmp_path / "o")
    assert set(a) == set(b) and all(same_bytes(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]["scale_fmt"] == "ue8m0"


def test_to_ue8m0_requantizes_float_scales_in_one_pass(fp8_ckpt, tmp_path):
    _, fp8 = fp8_ckpt
    res = cli("convert", fp8, tmp_path / "o", "--to", "fp8-ue8m0")
    assert res.output.count("requant   ") == 23 and "relative L2 error" in res.output
    q, out = read_dir(fp8), read_dir(tmp_path / "o")
    for n in fp8_weights(q):
        q2, s2 = reference.quant_fp8_block(q[n], scale_fmt="ue8m0", x_scale_inv=q[n + "_scale_inv"])
        assert same_bytes(out[n], q2) and same_bytes(out[n + "_scale_inv"], s2), n
        assert nx.is_power_of_two(out[n + "_scale_inv"])
    # structure is sound; requantizing twice costs accuracy, so the metric bands are loosened here
    cli("verify", fp8_ckpt[0], tmp_path / "o", "--all", "--maxae-bands", "0.02,0.05", "--cos-bands", "0.999,0.998")


def test_fp8_to_ct_and_back_is_byte_identical(fp8_ckpt, tmp_path):
    _, fp8 = fp8_ckpt
    cli("convert", fp8, tmp_path / "ct", "--to", "fp8-ct", "--no-repack")
    ct = read_dir(tmp_path / "ct")
    assert not [n for n in ct if n.endswith("_scale_inv")]
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
    w = qc["config_groups"]["group_0"]["weights"]
    assert (w["strategy"], w["block_structure"], w["num_bits"], w["type"]) == ("block", [128, 128], 8, "float")
    cli("convert", tmp_path / "ct", tmp_path / "back", "--to", "fp8", "--no-repack")
    a, b = tree_bytes(fp8), tree_bytes(tmp_path / "back")
    shards = [k for k in a if k.endswith(".safetensors")]
    assert shards and all(a[k] == b[k] for k in shards)
    assert read_dir(fp8).keys() == read_dir(tmp_path / "back").keys()
    qa = json.loads(a["config.json"])["quantization_config"]
    qb = json.loads(b["config.json"])["quantization_config"]
    assert qa == qb


def test_compressed_tensors_reads_our_fp8_ct(fp8_ckpt, tmp_path):
    """compressed-tensors' own dequantizer gives exactly our dequantized weights (per-module 2D linears;
    it has no convention for fused 3D expert tensors, which it leaves alone)."""
    ct_convert = pytest.importorskip("compressed_tensors.entrypoints.convert")
    _, fp8 = fp8_ckpt
    cli("convert", fp8, tmp_path / "ct", "--to", "fp8-ct")
    theirs = ct_convert.CompressedTensorsDequantizer(tmp_path / "ct", dtype=torch.float32).validate(
        read_dir(tmp_path / "ct"))
    q = read_dir(fp8)
    checked = 0
    for n in fp8_weights(q):
        if q[n].dim() == 2:
            mine = reference.dequant_fp8_block(q[n], q[n + "_scale_inv"], out_dtype=torch.float32)
            assert theirs[n].dtype == torch.float32 and torch.equal(theirs[n], mine), n
            checked += 1
    assert checked == 17


def test_transformers_loads_converted_bf16(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    cli("quantize", tmp_path / "bf16", tmp_path / "fp8", "--skip-verify")
    cli("convert", tmp_path / "fp8", tmp_path / "back", "--to", "bf16")
    from_fp8 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp8", dtype=torch.bfloat16)
    from_back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.bfloat16)
    assert getattr(from_back.config, "quantization_config", None) is None
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # transformers' own CPU dequantization of our FP8 output and our bf16 conversion agree exactly
        assert torch.equal(from_fp8(ids).logits, from_back(ids).logits)


def test_errors(fp8_ckpt, tmp_path):
    bf16, fp8 = fp8_ckpt
    res = cli("convert", bf16, tmp_path / "o", "--to", "bf16", ok=False)
    assert res.exit_code == 1 and "holds no FP8 weights" in res.output
    res = cli("convert", fp8, tmp_path / "o2", "--to", "fp8", ok=False)
    assert res.exit_code == 1 and "already block FP8" in res.output
    broken = tmp_path / "broken"
    cli("repack", fp8, broken)
    from safetensors.torch import save_file

    t = read_dir(broken)
    del t["model.language_model.layers.1.self_attn.q_proj.weight_scale_inv"]
    for p in broken.glob("*.safetensors"):
        p.unlink()
    save_file(t, str(broken / "model.safetensors"), metadata={"format": "pt"})
    (broken / "model.safetensors.index.json").unlink()
    res = cli("convert", broken, tmp_path / "o3", "--to", "bf16", ok=False)
    assert res.exit_code == 1
    assert "FP8 tensor 'model.language_model.layers.1.self_attn.q_proj.weight' has no" in res.output
