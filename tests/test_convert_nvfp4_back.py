"""`convert --to bf16|fp16` reads NVFP4 back (ModelOpt and compressed-tensors layouts; 2D, per-expert
2D and fused 3D experts), bit-exact with the twin's dequantization; FP8 tensors kept beside the
NVFP4 ones are dequantized too."""

import json

import pytest
import torch

from fp8norm import reference
from fp8norm.examples import make_example
from tests.ckpt_utils import cli, read_dir


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("nvfp4-back")
    moe = make_example(root / "moe", "qwen3.5-moe", "sharded")  # fused 3D experts
    per_expert = make_example(root / "pe", "qwen3-moe", "single")  # one 2D tensor per expert
    cli("quantize", moe, root / "moe-fp8", "-q", "--skip-verify")
    return moe, per_expert, root


def _check_back(nvfp4_dir, back, ct: bool, dtype=torch.bfloat16):
    q, out = read_dir(nvfp4_dir), read_dir(back)
    checked = 0
    for n, t in q.items():
        if ct and n.endswith(".weight_packed"):
            m = n.removesuffix(".weight_packed")
            gs = torch.reciprocal(q[m + ".weight_global_scale"].float()).reshape(())
            want = reference.dequant_nvfp4(t, q[m + ".weight_scale"], gs, out_dtype=dtype)
            got = out[m + ".weight"]
        elif not ct and n + "_scale_2" in q:
            want = reference.dequant_nvfp4(t, q[n + "_scale"], q[n + "_scale_2"], out_dtype=dtype)
            got = out[n]
        elif t.dtype == torch.float8_e4m3fn and n + "_scale_inv" in q:  # FP8 kept beside NVFP4
            want = reference.dequant_fp8_block(t, q[n + "_scale_inv"], out_dtype=dtype)
            got = out[n]
        else:
            continue
        assert got.dtype == dtype and torch.equal(got, want), n
        checked += 1
    assert not any(k.endswith(("_scale", "_scale_2", "_scale_inv", "weight_packed", "global_scale")) for k in out)
    assert "quantization_config" not in json.loads((back / "config.json").read_text())
    assert not (back / "hf_quant_config.json").exists()
    return checked


@pytest.mark.parametrize("fmt", ["nvfp4", "nvfp4-ct"])
def test_nvfp4_from_fp8_back_to_bf16(sources, tmp_path, fmt):
    _, _, root = sources
    cli("convert", root / "moe-fp8", tmp_path / "q", "--to", fmt, "-q")
    cli("convert", tmp_path / "q", tmp_path / "back", "--to", "bf16", "-q")
    n = _check_back(tmp_path / "q", tmp_path / "back", ct=fmt == "nvfp4-ct")
    # compressed-tensors: the 6 fused 3D expert tensors are written per expert and projection (4 x 3 each
    # gate_up + down pair), each read back as its own 2D weight
    assert n == (23 if fmt == "nvfp4" else 17 + 36)
    if fmt == "nvfp4":  # a fused 3D expert tensor with one global scale per expert went through
        assert read_dir(tmp_path / "q")["model.language_model.layers.1.mlp.experts.gate_up_proj_scale_2"].shape == (4,)


@pytest.mark.parametrize("fmt", ["nvfp4", "nvfp4-ct"])
def test_nvfp4_per_expert_back_to_fp16(sources, tmp_path, fmt):
    _, per_expert, _ = sources
    cli("convert", per_expert, tmp_path / "q", "--to", fmt, "-q")
    cli("convert", tmp_path / "q", tmp_path / "back", "--to", "fp16", "-q")
    assert _check_back(tmp_path / "q", tmp_path / "back", ct=fmt == "nvfp4-ct", dtype=torch.float16) == 32


def test_nvfp4_source_to_other_targets_is_one_clear_error(sources, tmp_path):
    _, per_expert, _ = sources
    cli("convert", per_expert, tmp_path / "q", "--to", "nvfp4", "-q")
    res = cli("convert", tmp_path / "q", tmp_path / "o", "--to", "fp8", "--scale-fmt", "ue8m0", ok=False)
    assert res.exit_code == 1 and "converts to bf16 or fp16 only" in res.output and "scale_scale_inv" not in res.output
