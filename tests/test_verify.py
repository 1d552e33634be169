"""`fp8norm verify`: passes a clean output, flags each kind of corruption as FAIL with the tensor named."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from fp8norm.cli import main
from fp8norm.examples import make_example
from fp8norm.verify import FAIL, Bands, verify
from tests.ckpt_utils import read_dir

SHARD = "model-00001-of-00001.safetensors"


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    src = make_example(root / "src", "qwen3-moe", "sharded")
    res = CliRunner().invoke(main, ["quantize", str(src), str(root / "fp8")])
    assert res.exit_code == 0, res.output
    return src, root / "fp8"


def corrupt(clean, tmp_path, edit):
    """A copy of the clean output with its single shard rewritten by `edit(tensors)`."""
    src, fp8 = clean
    bad = tmp_path / "bad"
    shutil.copytree(fp8, bad)
    tensors = read_dir(bad)
    edit(tensors)
    save_file(tensors, str(bad / SHARD), metadata={"format": "pt"})
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: SHARD for k in tensors}
    index["metadata"]["total_size"] = sum(t.numel() * t.element_size() for t in tensors.values())
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    return src, bad


def run(src, quant, *args):
    return CliRunner().invoke(main, ["verify", str(src), str(quant), *args])


def test_clean_output_passes(clean, tmp_path):
    res = run(*clean, "--all", "--json", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["status"] != FAIL and report["problems"] == []
    assert report["checked"] == report["fp8_tensors"] == 32 and report["kept_tensors"] == 13
    assert all(t["cos"] > 0.9995 and t["maxae"] < 0.01 for t in report["tensors"])
    assert "QUANTIZATION VERIFICATION SUMMARY" in res.output


def test_flipped_scale_fails_and_names_tensor(clean, tmp_path):
    name = "model.layers.1.mlp.experts.2.up_proj.weight"

    def edit(t):
        t[name + "_scale_inv"][1, 0] *= 4

    res = run(*corrupt(clean, tmp_path, edit), "--all")
    assert res.exit_code == 1
    assert f"FAIL  {name}:" in res.output


def test_missing_scale_fails(clean, tmp_path):
    name = "model.layers.0.self_attn.o_proj.weight"
    res = run(*corrupt(clean, tmp_path, lambda t: t.pop(name + "_scale_inv")))
    assert res.exit_code == 1
    assert f"tensor '{name}' is FP8 but has no {name}_scale_inv" in res.output


def test_swapped_tensors_fail(clean, tmp_path):
    a, b = "model.layers.0.mlp.experts.0.up_proj.weight", "model.layers.0.mlp.experts.1.up_proj.weight"

    def edit(t):
        for suffix in ("", "_scale_inv"):
            t[a + suffix], t[b + suffix] = t[b + suffix], t[a + suffix]

    res = run(*corrupt(clean, tmp_path, edit), "--all")
    assert res.exit_code == 1
    assert f"FAIL  {a}:" in res.output and f"FAIL  {b}:" in res.output


def test_changed_kept_tensor_and_wrong_scale_shape_fail(clean, tmp_path):
    def edit(t):
        t["model.norm.weight"] = t["model.norm.weight"] + 1
        t["model.layers.1.self_attn.q_proj.weight_scale_inv"] = torch.ones(2, 2)

    res = run(*corrupt(clean, tmp_path, edit))
    assert res.exit_code == 1
    assert "kept tensor 'model.norm.weight' differs from the source" in res.output
    assert "scale 'model.layers.1.self_attn.q_proj.weight_scale_inv' has shape [2, 2], expected [3, 3]" in res.output


def test_index_and_config_checks(clean, tmp_path):
    src, fp8 = clean
    bad = tmp_path / "bad"
    shutil.copytree(fp8, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    index["weight_map"].pop("lm_head.weight")
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    res = run(src, bad)
    assert res.exit_code == 1 and "'lm_head.weight'" in res.output and "missing from the index" in res.output
    shutil.copy(fp8 / "model.safetensors.index.json", bad / "model.safetensors.index.json")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["modules_to_not_convert"].append("model.layers.0.self_attn.q_proj")
    cfg["quantization_config"]["scale_fmt"] = "ue8m0"
    (bad / "config.json").write_text(json.dumps(cfg))
    res = run(src, bad)
    assert res.exit_code == 1
    assert "lists 'model.layers.0.self_attn.q_proj' in modules_to_not_convert, but it is FP8" in res.output
    assert "claims scale_fmt ue8m0" in res.output


def test_bands_are_configurable(clean):
    report = verify(*clean, samples=None, bands=Bands(cos_good=0.99999999, cos_warn=0.9999999))
    assert report.status == FAIL and "Cosine similarity is low" in report.format()
    res = run(*clean, "--cos-bands", "0.99999999,0.9999999")
    assert res.exit_code == 1
    assert run(*clean, "--cos-bands", "nope").exit_code == 2


def test_quantize_verifies_what_it_wrote(tmp_path):
    src = make_example(tmp_path / "src", "llama", "single")
    res = CliRunner().invoke(main, ["quantize", str(src), str(tmp_path / "o"), "--verify-samples", "3"])
    assert res.exit_code == 0 and "Checked             : 3" in res.output
    res = CliRunner().invoke(main, ["quantize", str(src), str(tmp_path / "p"), "--skip-verify"])
    assert res.exit_code == 0 and "VERIFICATION" not in res.output
    # a verification that finds a problem says so in the summary (rms k=1 clips hard)
    res = CliRunner().invoke(main, ["quantize", str(src), str(tmp_path / "r"), "--calib", "rms", "--rms-factor", "1"])
    assert "FAIL: do not deploy" in res.output and "Raise --rms-factor" in res.output
