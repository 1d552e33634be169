"""fp8norm.formats.w4a16 (int4 W4A16, compressed-tensors `pack-quantized`) against compressed-tensors
0.20.1 itself: its ModelCompressor compresses a model holding fp8norm's scales into the same bytes, and
decompresses fp8norm's tensors into the weight fp8norm decodes; its own serialization of the W4A16 preset
is the config fp8norm writes. The vLLM 0.32 rules, shapes and source checks against hand-computed cases."""

import json
import math

import pytest
import torch

from fp8norm import formats
from fp8norm.formats import w4a16 as w4
from fp8norm.kernels.numerics import int4
from fp8norm.st_io import DTYPE_NAMES, OutEntry
from tests.readers import reader

M, N = 64, 384  # three groups of 128 per row


def gaussian(shape, dtype=torch.bfloat16, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def ct_model(x: torch.Tensor, scale: torch.Tensor):
    """A module tree `proj` (Linear holding x, W4A16 with weight_scale = `scale`) + `lm_head` (ignored),
    quantized by compressed-tensors and compressed by its ModelCompressor; returns (model, compressor)."""
    ct = reader("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme

    model = torch.nn.Module()
    model.proj = torch.nn.Linear(x.shape[1], x.shape[0], bias=False, dtype=x.dtype)
    model.lm_head = torch.nn.Linear(x.shape[0], 8, bias=False, dtype=x.dtype)
    qc = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme("W4A16", ["Linear"])}, ignore=["lm_head"])
    apply_quantization_config(model, qc)
    with torch.no_grad():
        model.proj.weight.copy_(x)
        model.proj.weight_scale.copy_(scale)
    compressor = ModelCompressor.from_pretrained_model(model, w4.CT_FORMAT)
    compressor.compress_model(model)
    assert ct.__version__ == "0.20.1"  # the version the layout and config are transcribed from
    return model, compressor


# --------------------------------------------------------------------------- against compressed-tensors


@pytest.mark.parametrize("rule,ct_dtype", [("ct-cpu", torch.bfloat16), ("ct", torch.float32)])
def test_packed_bytes_equal_model_compressor(rule, ct_dtype):
    """compressed-tensors on CPU divides in the weight's dtype ("ct-cpu" on a bf16 model); its CUDA kernel in
    fp32, which its CPU path also does on an fp32 model holding the same values ("ct")."""
    x = gaussian((M, N), seed=1)
    packed, scale, shape = w4.encode(x, rule=rule)
    model, _ = ct_model(x.to(ct_dtype), scale.to(ct_dtype))
    theirs = model.proj
    assert theirs.weight_packed.dtype == torch.int32
    assert theirs.weight_packed.numpy().tobytes() == packed.numpy().tobytes()
    assert torch.equal(theirs.weight_shape, shape) and theirs.weight_shape.dtype == torch.int64
    assert not hasattr(theirs, "weight_zero_point")  # symmetric: no zero point stored


def test_rules_give_different_bytes_here():
    """The two parametrizations above are not the same test: the rules differ on this weight."""
    x = gaussian((M, N), seed=1)
    assert not torch.equal(w4.encode(x, rule="ct")[0], w4.encode(x, rule="ct-cpu")[0])


def test_model_compressor_decompresses_to_decode():
    x = gaussian((M, N), seed=2)
    tensors = w4.encode(x)
    model, compressor = ct_model(x, tensors[1])
    with torch.no_grad():  # fp8norm's tensors in place of compressed-tensors' own
        for suffix, t in zip(w4.SUFFIXES, tensors):
            getattr(model.proj, suffix).copy_(t)
    compressor.decompress_model(model)
    theirs = model.proj.weight
    ours = w4.decode(tensors)
    assert theirs.dtype == ours.dtype == torch.bfloat16
    assert torch.equal(theirs, ours)


def test_scale_dtype_is_the_weights_as_compressed_tensors_writes_it():
    for dtype in (torch.bfloat16, torch.float16):
        x = gaussian((M, N), dtype, seed=3)
        model, _ = ct_model(x, w4.encode(x)[1])
        assert model.proj.weight_scale.dtype == dtype == w4.encode(x)[1].dtype


def test_config_is_what_compressed_tensors_serializes(tmp_path):
    x = gaussian((M, N))
    _, compressor = ct_model(x, w4.encode(x)[1])
    compressor.update_config(str(tmp_path))
    theirs = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    # ModelCompressor's envelope: the writing library's version, empty sparsity/transform configs
    assert theirs.pop("version") == "0.20.1"
    assert theirs.pop("sparsity_config") == {} and theirs.pop("transform_config") == {}
    assert w4.quantization_config(["lm_head"]) == theirs
    from compressed_tensors.quantization import QuantizationConfig
    parsed = QuantizationConfig.model_validate(w4.quantization_config(["lm_head"]))
    assert {**parsed.model_dump(), "quant_method": "compressed-tensors"} == theirs


# --------------------------------------------------------------------------- tensors


def test_outputs_names_shapes_dtypes():
    name = "model.layers.0.mlp.down_proj.weight"
    assert w4.outputs(name, (M, N)) == [
        OutEntry("model.layers.0.mlp.down_proj.weight_packed", "I32", (M, N // 8)),
        OutEntry("model.layers.0.mlp.down_proj.weight_scale", "BF16", (M, N // 128)),
        OutEntry("model.layers.0.mlp.down_proj.weight_shape", "I64", (2,))]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        tensors = w4.encode(gaussian((M, N), dtype))
        entries = w4.outputs(name, (M, N), DTYPE_NAMES[dtype])
        assert [(DTYPE_NAMES[t.dtype], tuple(t.shape)) for t in tensors] == [(e.dtype, e.shape) for e in entries]
        assert tensors[2].tolist() == [M, N]


def test_hand_packed_word():
    """One row of 128: codes -8, -7, 0, 1, 2, 3, 6, 7 in the first word (element 8j+i in bits 4i..4i+3 of
    word j, stored as q + 8); the row's amax 7.5 gives the scale 1 exactly."""
    row = torch.zeros(1, 128)
    row[0, :8] = torch.tensor([-7.5, -7, 0, 1, 2, 3, 6, 7])  # -7.5 / 1 rounds (ties to even) to -8
    packed, scale, _ = w4.encode(row.bfloat16())
    assert scale.tolist() == [[1.0]]
    assert packed[0, 0].item() == 0xFEBA9810 - (1 << 32)
    assert packed[0, 1:].tolist() == [int.from_bytes(b"\x88" * 4, "little", signed=True)] * 15


def test_kernel_path_gives_the_twins_bytes(monkeypatch):
    x = gaussian((16, 256), seed=4)
    twin = w4.encode(x)
    monkeypatch.setenv("FP8NORM_BACKEND", "triton")  # the Triton kernel, under its interpreter on CPU
    kernel = w4.encode(x)
    assert all(torch.equal(a, b) for a, b in zip(twin, kernel))
    assert torch.equal(w4.decode(kernel), w4.decode(twin))


@pytest.mark.parametrize("shape,needle", [
    ((M, 200), "needs the input (last) dim to be a multiple of 128, got shape [64, 200]"),
    ((M, 100), "needs the input (last) dim to be a multiple of 128, got shape [64, 100]"),
    ((2, M, N), "stores 2D weights only, got shape [2, 64, 384]")])
def test_unsupported_shapes_are_refused_in_one_line(shape, needle):
    name = "model.layers.3.mlp.up_proj.weight"
    assert needle in w4.unsupported_reason(name, shape)
    zeros = torch.zeros(shape, dtype=torch.bfloat16)
    for call in (lambda: w4.outputs(name, shape), lambda: w4.encode(zeros, name=name)):
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value).startswith(name + ": ") and needle in str(e.value) and "\n" not in str(e.value)
    assert w4.unsupported_reason(name, (M, N)) is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -0.5])
def test_damaged_scale_is_refused_naming_it(bad):
    tensors = w4.encode(gaussian((M, N)))
    tensors[1][5, 2] = bad
    tensors[1][7, 0] = bad
    with pytest.raises(ValueError) as e:
        w4.decode(tensors, name="model.layers.1.self_attn.o_proj.weight")
    assert str(e.value) == ("model.layers.1.self_attn.o_proj.weight_scale: 2 scale(s) not finite and > 0 "
                            "(NaN, Inf or <= 0), first at [5, 2]; the weight cannot be read")


def test_inconsistent_tensors_are_refused_naming_the_module():
    packed, scale, shape = w4.encode(gaussian((M, N)))
    cases = [((packed, scale, torch.tensor([M, N - 128])),
              "weight_shape [64, 256] disagrees with weight_packed [64, 48]"),
             ((packed, scale[:, :2], shape), "weight_scale [64, 2]"),
             ((packed.view(torch.float32), scale, shape), "weight_packed torch.float32 [64, 48]"),
             ((packed, scale, shape.int()), "weight_shape torch.int32")]
    for tensors, needle in cases:
        with pytest.raises(ValueError) as e:
            w4.decode(tensors, name="lin.weight")
        assert str(e.value).startswith("lin: ") and needle in str(e.value), str(e.value)


def test_sqnr_floor_on_gaussian_weights():
    """The floor the format states, re-measured on a smaller Gaussian weight with encode/decode."""
    x = gaussian((1024, 4096), seed=7)
    err = (w4.decode(w4.encode(x)).double() - x.double()).pow(2).sum()
    sqnr = 10 * math.log10(x.double().pow(2).sum() / err)
    assert abs(sqnr - w4.FLOOR_SQNR_DB) < 0.1, sqnr
    assert w4.FORMAT.floor_sqnr_db == w4.FLOOR_SQNR_DB


# --------------------------------------------------------------------------- vLLM 0.32 rules


def config_with(**changes):
    qc = w4.quantization_config(["lm_head"])
    group = qc["config_groups"]["group_0"]
    for key, value in changes.items():
        if key in ("input_activations", "format"):
            group[key] = value
        else:
            group["weights"][key] = value
    return {"quantization_config": qc}


def test_the_config_passes_every_rule():
    assert w4.FORMAT.config_problems(config_with()) == []
    # the group's format may be left to the global one (compressed_tensors.py l.792)
    assert w4.vllm_wna16(config_with(format=None)) == []


@pytest.mark.parametrize("changes,needle", [
    ({"format": "float-quantized"}, "format 'float-quantized' is not pack-quantized"),
    ({"strategy": "tensor"}, "strategy 'tensor' is not group or channel"),
    ({"dynamic": True}, "dynamic weights"),
    ({"input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}},
     "input_activations set"),
    ({"type": "float"}, "weights are 'float' 4-bit"),
    ({"symmetric": False}, "asymmetric weights need weight_zero_point"),
    ({"group_size": 256}, "group_size 256 is not one Marlin serves [-1, 32, 64, 128]"),
    ({"actorder": "group"}, "actorder 'group' is no longer supported")])
def test_vllm_refuses_each_broken_field(changes, needle):
    problems = w4.vllm_wna16(config_with(**changes))
    assert len(problems) == 1 and problems[0].startswith("config_groups.group_0: ") and needle in problems[0], problems


def test_vllm_shape_rules():
    """Dense: whole groups of 128 per tensor-parallel rank (Marlin pads the rest). 11008 = 86 x 128:
    split 2 -> 43 groups each, split 4 -> 21.5. Fused MoE: hidden 2880 = 22.5 x 128 (gpt-oss) is refused."""
    assert w4.vllm_shape_problems("down", (4096, 11008), input_split=2) == []
    assert w4.vllm_shape_problems("down", (4096, 11008), input_split=4) == [
        "down: 11008 input features split 4 way(s) is not whole groups of 128"]
    assert w4.vllm_shape_problems("o", (100, 4096)) == []  # N_out is padded
    assert w4.vllm_moe_problems(2048, 1408) == []
    assert w4.vllm_moe_problems(2880, 1408, tp=2) == [
        "hidden_size 2880 is not a multiple of 128 (fused-MoE Marlin)",
        "moe intermediate size 1408 split 2 way(s) is not whole groups of 128 (fused-MoE Marlin)"]


# --------------------------------------------------------------------------- the registered format


def test_registered_under_its_name_and_alias():
    f = w4.FORMAT
    assert (f.name, f.aliases, f.element, f.scale_block, f.layout) == (
        "w4a16", ("int4",), "int4", (1, 128), "compressed-tensors")
    assert f.readers == ("compressed-tensors",) and f.from_fp8 is None
    assert w4.GROUP_SIZE == int4.GROUP_SIZE and w4.PER_WORD == int4.PER_WORD  # stated in the module (no torch)
    assert formats.FORMATS["w4a16"] is f and formats.get("int4") is f


def test_format_outputs_are_the_layouts_and_keep_what_has_none():
    name = "model.layers.0.mlp.down_proj.weight"
    assert w4.FORMAT.outputs(name, (M, N), "F16") == w4.outputs(name, (M, N), "F16")
    assert w4.FORMAT.kept_reason(name, (M, N)) is None
    assert w4.FORMAT.kept_reason(name, (M, 200)) == "w4a16:unaligned-kept"
    assert w4.FORMAT.kept_reason("model.layers.0.mlp.experts.gate_up_proj", (4, 2 * M, N)) == "w4a16:3d-kept"


def test_compare_member_judges_by_the_rules():
    """GOOD on what encode made (either quotient rule), FAIL naming the element for one changed code and the
    scale for one changed scale; a quotient just over 7.5 clamped to 7 is not called wrong."""
    x = gaussian((M, N), seed=5)
    x[0, :128] = 0.0
    x[0, 0] = 7.9375  # scale bf16(7.9375 / 7.5) = 1.0546875 (rounded down): quotient 7.526 -> 7
    for rule in ("ct", "ct-cpu"):
        packed, scale, shape = w4.encode(x, rule=rule)
        assert scale[0, 0].item() == 1.0546875 and int4.unpack_int4(packed)[0, 0].item() == 7
        check = w4.FORMAT.compare_member("m", "s", [packed, scale, shape], x, None)
        assert check.wrong_elements == check.wrong_scales == 0 and "rounding" not in check.bands, check.first_wrong
    bad = packed.clone()
    bad[3, 2] ^= 0x30  # element 8*2 + 1 of row 3: nibble xor 3
    check = w4.FORMAT.compare_member("m", "s", [bad, scale, shape], x, None)
    assert check.status == "FAIL" and check.wrong_elements == 1 and check.first_wrong.startswith("element [3, 17]: ")
    worse = scale.clone()
    worse[5, 1] *= 4
    check = w4.FORMAT.compare_member("m", "s", [packed, worse, shape], x, None)
    assert check.status == "FAIL" and check.wrong_scales == 1 and check.first_wrong_scale.startswith("scale [5, 1]: ")


# --------------------------------------------------------------------------- through the commands


def test_an_fp16_model_keeps_its_scales_in_fp16_and_reads_back(tmp_path):
    """`quantize --to int4` (the alias) on an fp16 model: F16 scales, as compressed-tensors writes them;
    `verify` passes it; `convert --to fp16` gives decode's values."""
    from safetensors.torch import load_file, save_file

    from fp8norm.examples import make_example
    from tests.ckpt_utils import cli, read_dir

    src = make_example(tmp_path / "bf16", "qwen3-moe", "single")
    (shard,) = src.glob("*.safetensors")
    save_file({k: v.half() for k, v in load_file(shard).items()}, shard, metadata={"format": "pt"})
    cli("quantize", src, tmp_path / "q", "--to", "int4", "-q")
    out, x = read_dir(tmp_path / "q"), read_dir(src)
    m = "model.layers.0.self_attn.o_proj"
    assert out[m + ".weight_scale"].dtype == torch.float16 and m + ".weight" not in out
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc == w4.quantization_config(qc["ignore"]) and "lm_head" in qc["ignore"]
    assert "FAIL 0" in cli("verify", src, tmp_path / "q", "--all").output
    cli("convert", tmp_path / "q", tmp_path / "back", "--to", "fp16", "-q")
    back = read_dir(tmp_path / "back")
    assert set(back) == set(x)
    tensors = [out[m + "." + s] for s in w4.SUFFIXES]
    assert torch.equal(back[m + ".weight"], w4.decode(tensors, out_dtype=torch.float16))
    assert torch.equal(back["model.norm.weight"], x["model.norm.weight"])


def quantized_then_edited(tmp_path, edit):
    """The qwen3-moe example quantized to w4a16 in tmp_path / "q", its tensors then changed by `edit`
    (a dict of tensors, changed in place); returns the bf16 source."""
    from safetensors.torch import load_file, save_file

    from fp8norm.examples import make_example
    from tests.ckpt_utils import cli

    src = make_example(tmp_path / "bf16", "qwen3-moe", "single")
    cli("quantize", src, tmp_path / "q", "--to", "w4a16", "-q", "--skip-verify")
    (shard,) = (tmp_path / "q").glob("*.safetensors")
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    return src


def test_a_wrong_weight_shape_is_refused_naming_it(tmp_path):
    from tests.ckpt_utils import cli, one_line_error

    name = "model.layers.1.self_attn.k_proj.weight_shape"
    src = quantized_then_edited(tmp_path, lambda tensors: tensors.update({name: torch.tensor([1024, 128])}))
    one_line_error(cli("convert", tmp_path / "q", tmp_path / "back", "--to", "bf16", ok=False),
                   f"{name!r} is I64 [2] holding [1024, 128]; expected I64 [2] holding [1024, 256]")
    res = cli("verify", src, tmp_path / "q", ok=False)
    assert res.exit_code == 3 and f"{name!r} is I64 [2] holding [1024, 128]" in res.output


def test_verify_names_a_scale_the_int4_rule_does_not_give(tmp_path):
    from tests.ckpt_utils import cli

    module = "model.layers.1.self_attn.k_proj"
    src = quantized_then_edited(tmp_path, lambda tensors: tensors[module + ".weight_scale"][5, 1].mul_(4))
    res = cli("verify", src, tmp_path / "q", "--all", ok=False)
    assert res.exit_code == 3
    assert f"FAIL  {module}: 1 scale(s) not the W4A16 rule's, e.g. scale [5, 1]: " in res.output, res.output


def test_3d_and_unaligned_weights_are_kept_with_their_rule(tmp_path):
    """q/k/v with k 272 wide (not whole groups): k kept, q and v with it (one fused layer); fused 3D experts kept;
    the output verifies and reads back."""
    from safetensors.torch import save_file

    from tests.ckpt_utils import cli, read_dir

    src = tmp_path / "src"
    src.mkdir()
    t = {f"model.layers.0.self_attn.{p}.weight": gaussian((256, 272 if p == "k_proj" else 256), seed=i)
         for i, p in enumerate(("q_proj", "k_proj", "v_proj"))}
    t["model.layers.0.mlp.experts.gate_up_proj"] = gaussian((4, 512, 256), seed=8)
    t["model.layers.0.mlp.down_proj.weight"] = gaussian((256, 256), seed=9)
    save_file(t, str(src / "model.safetensors"))
    (src / "config.json").write_text("{}")
    res = cli("plan", src, "--to", "w4a16")
    assert "w4a16:unaligned-kept" in res.output and "ct:fused-with-kept" in res.output
    assert "w4a16:3d-kept" in res.output and res.output.count("->w4a16") == 1
    cli("quantize", src, tmp_path / "q", "--to", "w4a16", "-q")
    out = read_dir(tmp_path / "q")
    assert sorted(k for k in out if "weight_" in k) == [f"model.layers.0.mlp.down_proj.{s}" for s in w4.SUFFIXES]
    assert all(torch.equal(out[k], t[k]) for k in t if k in out) and len(out) == len(t) + 2
    assert "FAIL 0" in cli("verify", src, tmp_path / "q", "--all").output
