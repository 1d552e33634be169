"""`fp8norm convert`: dequantize, ue8m0, compressed-tensors FP8 and back, read by independent readers."""

import json

import pytest
import torch

from fp8norm.kernels.numerics import fp8_block as nx
from fp8norm import reference
from fp8norm.examples import make_example
from tests.ckpt_utils import cli, read_dir, same_bytes, save_tiny_qwen3, tree_bytes
from tests.readers import reader


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
    res = cli("convert", tmp_path / "pow2", tmp_path / "o", "--to", "fp8", "--scale-fmt", "ue8m0")
    assert "requant" not in res.output  # nothing requantized
    a, b = read_dir(tmp_path / "pow2"), read_dir(tmp_path / "o")
    assert set(a) == set(b) and all(same_bytes(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]["scale_fmt"] == "ue8m0"


def test_to_ue8m0_requantizes_float_scales_in_one_pass(fp8_ckpt, tmp_path):
    _, fp8 = fp8_ckpt
    res = cli("convert", fp8, tmp_path / "o", "--to", "fp8", "--scale-fmt", "ue8m0")
    # one summary line, not a line per tensor
    assert res.output.count("requant   ") == 1 and "23 tensor(s) requantized to power-of-two scales" in res.output
    q, out = read_dir(fp8), read_dir(tmp_path / "o")
    for n in fp8_weights(q):
        q2, s2 = reference.quant_fp8_block(q[n], scale_fmt="ue8m0", x_scale_inv=q[n + "_scale_inv"])
        assert same_bytes(out[n], q2) and same_bytes(out[n + "_scale_inv"], s2), n
        assert nx.is_power_of_two(out[n + "_scale_inv"])
    # rounded twice: within 1.5 e4m3 steps of the bf16 source (fp8norm.json says it was requantized)
    res = cli("verify", fp8_ckpt[0], tmp_path / "o", "--all")
    assert "Correctly rounded   : 23 of 23" in res.output


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
    ct_convert = reader("compressed_tensors.entrypoints.convert")
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
    transformers = reader("transformers")
    save_tiny_qwen3(tmp_path / "bf16")
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


# ------------------------------------------------------------------------------------------- NVFP4

QKV = ("q_proj", "k_proj", "v_proj")


def _joint_amax(tensors, names, from_fp8):
    from fp8norm.reference import nvfp4_amax

    return torch.stack([nvfp4_amax(tensors[n], src_scale_inv=tensors[n + "_scale_inv"] if from_fp8 else None)
                        for n in names]).amax(0)


@pytest.mark.parametrize("source", ["fp8", "bf16"])
def test_nvfp4_modelopt_layout_and_joint_scales(fp8_ckpt, tmp_path, source):
    from fp8norm.reference import quant_nvfp4

    src = fp8_ckpt[1] if source == "fp8" else fp8_ckpt[0]
    res = cli("convert", src, tmp_path / "o", "--to", "nvfp4")
    assert "23 to NVFP4" in res.output
    s, out = read_dir(src), read_dir(tmp_path / "o")
    p = "model.language_model.layers.1"
    names = [f"{p}.self_attn.{x}.weight" for x in QKV]
    joint = _joint_amax(s, names, source == "fp8")
    for n in names:
        packed, ws, ws2 = quant_nvfp4(s[n], global_amax=joint, src_scale_inv=s.get(n + "_scale_inv"))
        assert same_bytes(out[n], packed) and same_bytes(out[n + "_scale"], ws) and same_bytes(out[n + "_scale_2"], ws2)
        assert out[n].dtype == torch.uint8 and out[n].shape == (s[n].shape[0], s[n].shape[1] // 2)
    for layer in ("model.language_model.layers.0", "model.language_model.layers.1", "mtp.layers.0"):
        if f"{layer}.self_attn.q_proj.weight_scale_2" in out:
            v = {out[f"{layer}.self_attn.{x}.weight_scale_2"].item() for x in QKV}
            assert len(v) == 1  # q, k, v share one global scale
        if f"{layer}.mlp.shared_expert.gate_proj.weight_scale_2" in out:
            assert torch.equal(out[f"{layer}.mlp.shared_expert.gate_proj.weight_scale_2"],
                               out[f"{layer}.mlp.shared_expert.up_proj.weight_scale_2"])
    assert out[f"{p}.self_attn.o_proj.weight_scale_2"].item() != out[f"{p}.self_attn.q_proj.weight_scale_2"].item()
    # a fused 3D expert tensor: one global scale per expert, gate and up halves sharing it
    assert out[f"{p}.mlp.experts.gate_up_proj_scale_2"].shape == (4,)
    assert out[f"{p}.mlp.experts.gate_up_proj"].shape == (4, 512, 128)
    hq = json.loads((tmp_path / "o" / "hf_quant_config.json").read_text())
    # weight-only (no input_scale in the files): vLLM's rules in tests/test_modelopt_config.py
    assert hq["producer"]["name"] == "modelopt" and hq["quantization"]["quant_algo"] == "W4A16_NVFP4"
    assert hq["quantization"]["group_size"] == 16 and "lm_head" in hq["quantization"]["exclude_modules"]
    qc = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == "W4A16_NVFP4" and "lm_head" in qc["ignore"]
    assert same_bytes(out["lm_head.weight"], s["lm_head.weight"])


def test_nvfp4_ct_read_by_compressed_tensors(fp8_ckpt, tmp_path):
    """compressed-tensors' dequantizer (which decompresses NVFP4 in bf16) gives exactly our bf16
    dequantization; its config model accepts ours. Fused 3D experts are written per expert and
    projection (compressed-tensors has no 3D layout), each expert's slices the twin's quantization of
    the fused tensor: one global scale per expert, shared by its gate and up."""
    ct = reader("compressed_tensors")
    from compressed_tensors.entrypoints.convert import CompressedTensorsDequantizer

    from fp8norm.reference import dequant_nvfp4, quant_nvfp4

    _, fp8 = fp8_ckpt
    res = cli("convert", fp8, tmp_path / "o", "--to", "nvfp4-ct")
    assert "23 to NVFP4" in res.output
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    ct.quantization.QuantizationConfig.model_validate(cfg["quantization_config"])
    ours, s = read_dir(tmp_path / "o"), read_dir(fp8)
    theirs = CompressedTensorsDequantizer(tmp_path / "o", dtype=torch.bfloat16).validate(dict(ours))
    modules = [k.removesuffix(".weight_packed") for k in ours if k.endswith(".weight_packed")]
    fused = [n for n in s if n.endswith((".experts.gate_up_proj", ".experts.down_proj"))]
    assert len(fused) == 6 and all(s[n].dim() == 3 and n not in ours for n in fused)
    # 17 2D linears; 3 layers x 4 experts x (gate, up, down)
    assert len(modules) == 17 + 36
    for m in modules:
        assert ours[m + ".weight_global_scale"].shape == (1,)
        mine = dequant_nvfp4(ours[m + ".weight_packed"], ours[m + ".weight_scale"],
                             torch.reciprocal(ours[m + ".weight_global_scale"]).reshape(()), out_dtype=torch.bfloat16)
        assert torch.equal(theirs[m + ".weight"], mine), m
    for n in fused:
        packed, ws, ws2 = quant_nvfp4(s[n], src_scale_inv=s[n + "_scale_inv"])
        parts = ("gate_proj", "up_proj") if n.endswith("gate_up_proj") else ("down_proj",)
        prefix = n.removesuffix(".gate_up_proj").removesuffix(".down_proj")
        for e in range(s[n].shape[0]):
            for p, part in enumerate(parts):
                m = f"{prefix}.{e}.{part}"
                assert same_bytes(ours[m + ".weight_packed"], packed[e].chunk(len(parts))[p].contiguous()), m
                assert same_bytes(ours[m + ".weight_scale"], ws[e].chunk(len(parts))[p].contiguous()), m
                assert same_bytes(ours[m + ".weight_global_scale"], torch.reciprocal(ws2[e]).reshape(1)), m
    for layer in ("model.language_model.layers.1", "mtp.layers.0"):
        g = {ours[f"{layer}.self_attn.{x}.weight_global_scale"].item() for x in QKV}
        assert len(g) == 1
    assert not [n for n, t in ours.items() if t.dtype == torch.float8_e4m3fn and not n.endswith("weight_scale")]


def test_nvfp4_unaligned_is_an_error_or_kept(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    t = {"model.layers.0.self_attn.o_proj.weight": torch.randn(256, 200, generator=g).bfloat16(),
         "model.layers.0.mlp.down_proj.weight": torch.randn(256, 512, generator=g).bfloat16()}
    save_file(t, str(src / "model.safetensors"))
    (src / "config.json").write_text("{}")
    res = cli("convert", src, tmp_path / "o", "--to", "nvfp4", ok=False)
    assert res.exit_code == 1
    assert "'model.layers.0.self_attn.o_proj.weight' [256, 200]: input dimension not a multiple of 16" in res.output
    assert "--keep-unaligned" in res.output and not (tmp_path / "o").exists()
    cli("convert", src, tmp_path / "o", "--to", "nvfp4", "--keep-unaligned")
    out = read_dir(tmp_path / "o")
    assert same_bytes(out["model.layers.0.self_attn.o_proj.weight"], t["model.layers.0.self_attn.o_proj.weight"])
    assert out["model.layers.0.mlp.down_proj.weight"].dtype == torch.uint8


@pytest.mark.parametrize("to", ["fp8-ue8m0", "fp8-channel", "mxfp8", "mxfp4", "nvfp4", "nvfp4-ct"])
def test_convert_verifies_what_it_requantized(fp8_ckpt, tmp_path, to):
    """Requantized outputs are re-read and checked against the dequantized FP8 source (every element
    correctly rounded, cost within the target format's bands); the summary says so."""
    _, fp8 = fp8_ckpt
    res = cli("convert", fp8, tmp_path / "o", "--to", to, "--verify-samples", "100")
    assert "QUANTIZATION VERIFICATION SUMMARY" in res.output and "FAIL 0" in res.output, res.output
    checked = int(res.output.split("Checked             : ")[1].split()[0])
    assert checked >= 23  # every requantized tensor (per expert for the schemes), none skipped
    assert "verification" not in json.loads((tmp_path / "o" / "fp8norm.json").read_text())
    res = cli("convert", fp8, tmp_path / "s", "--to", to, "--skip-verify")
    assert "VERIFICATION SUMMARY" not in res.output


def test_convert_needs_no_check_where_nothing_is_rounded(fp8_ckpt, tmp_path):
    res = cli("convert", fp8_ckpt[1], tmp_path / "o", "--to", "bf16")
    assert "VERIFICATION SUMMARY" not in res.output


def test_convert_exits_3_when_its_verification_fails(fp8_ckpt, tmp_path, monkeypatch):
    """A requantization that writes wrong bytes (here: one weight negated) is caught by convert's own
    check: exit 3, the tensor named, the output kept and marked failed in fp8norm.json."""
    from fp8norm import convert as conv
    from fp8norm.verify import EXIT_VERIFY_FAILED, FAIL

    victim = fp8_weights(read_dir(fp8_ckpt[1]))[0]
    apply = conv.Convert.apply

    def negate_victim(self, t, xs, plan, device):
        outs = apply(self, t, xs, plan, device)
        if t.name == victim:
            outs[0] = (-outs[0].float()).to(outs[0].dtype)
        return outs

    monkeypatch.setattr(conv.Convert, "apply", negate_victim)
    res = cli("convert", fp8_ckpt[1], tmp_path / "o", "--to", "fp8", "--scale-fmt", "ue8m0", "--verify-samples", "100", ok=False)
    assert res.exit_code == EXIT_VERIFY_FAILED, res.output
    assert victim in res.output
    prov = json.loads((tmp_path / "o" / "fp8norm.json").read_text())
    assert prov["verification"]["status"] == FAIL and victim in prov["verification"]["failed_tensors"]
