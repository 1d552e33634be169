"""`fp8norm verify`: correct outputs pass whatever the weights look like, each corruption FAILs with
the tensor named, the cost is measured against e4m3's own floor, exit codes, the plot."""

import json
import math
import shutil
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from fp8norm.kernels.numerics import fp8_block as nx
from fp8norm.calibrate import CalibSettings, calibrated_quant
from fp8norm.cli import main
from fp8norm.examples import heavy_tailed, make_example
from fp8norm.checks import FAIL, FLOOR_REL_RMS, GOOD, WARN, Bands, compare, rne_mismatch
from fp8norm.reference import quant_fp8_channel
from fp8norm.verify import EXIT_VERIFY_FAILED, per_layer_sqnr, tensor_kind, verify
from tests.ckpt_utils import read_dir
from tests.readers import reader

SHARD = "model-00001-of-00001.safetensors"
BLOCK = (128, 128)


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
    return CliRunner().invoke(main, ["verify", str(src), str(quant), *map(str, args)])


def gaussian(shape, seed=0, std=0.02):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * std).bfloat16()


def heavy(shape, seed=0):
    return heavy_tailed(shape, torch.Generator().manual_seed(seed)).bfloat16()


# -- the numbers, on tensors -----------------------------------------------------------------------

@pytest.mark.parametrize("weights", [gaussian, heavy], ids=["gaussian", "heavy-tailed-outlier-columns"])
@pytest.mark.parametrize("scale_fmt,scale_dtype", [("float", torch.float32), ("float", torch.bfloat16),
                                                   ("ue8m0", torch.float32), ("ue8m0", torch.float8_e8m0fnu)])
def test_correct_max_calibrated_output_is_good(weights, scale_fmt, scale_dtype):
    x = weights((3, 300, 520))  # ragged tiles, 3 experts
    x[1, :128, :128] = 0  # an all-zero tile: amax floor scale, zeros
    q, s = calibrated_quant(x, CalibSettings("max"), scale_fmt=scale_fmt, scale_dtype=scale_dtype)
    c = compare("w", "f", q, s, x, BLOCK, Bands.for_calibration("max"))
    assert c.status == GOOD and c.wrong_elements == 0 and c.clipped_frac == 0, c
    # on e4m3's floor whatever the scale and the outliers: rel RMS within 15% of 0.0265
    assert abs(c.rel_rms / FLOOR_REL_RMS - 1) < 0.15 and c.sqnr_db > 29.5
    assert 1 - c.cos == pytest.approx(c.rel_rms ** 2 / 2, rel=0.05)
    # a large-scale tensor gives the same relative numbers (no absolute bands)
    q2, s2 = calibrated_quant(x * 1000, CalibSettings("max"), scale_fmt=scale_fmt, scale_dtype=scale_dtype)
    c2 = compare("w", "f", q2, s2, (x * 1000), BLOCK)
    assert c2.status == GOOD and c2.rel_rms == pytest.approx(c.rel_rms, rel=0.02)


def test_every_calibration_is_correctly_rounded():
    x = heavy((256, 384))
    for mode in ("rms", "percentile", "mse"):
        q, s = calibrated_quant(x, CalibSettings(mode, mse_grid=8))
        c = compare("w", "f", q, s, x, BLOCK, Bands.for_calibration(mode))
        assert c.wrong_elements == 0, mode


def test_rounding_rule_by_hand():
    scale = torch.tensor([[0.5]])
    x = torch.tensor([[1.0, 1.0625, 1.0626, 300.0, -300.0, 0.0004, 0.0006]])  # /0.5: 2, 2.125 (tie), ...
    q = torch.tensor([[2.0, 2.0, 2.25, 448.0, -448.0, 0.0, 0.001953125]])
    assert not rne_mismatch(q, x, scale.expand_as(x)).any()
    # one step off, a sign flip, saturation not at 448, a NaN: each one element wrong
    for i, v in ((0, 2.25), (2, 2.0), (3, 416.0), (4, 448.0), (6, float("nan"))):
        q2 = q.clone()
        q2[0, i] = v
        assert rne_mismatch(q2, x, scale.expand_as(x)).nonzero().tolist() == [[0, i]], i


@pytest.mark.parametrize("chunk_elems", [1 << 16, 128 * 256, 1])  # whole rows, tiles cut across the columns, one tile
def test_a_wrong_element_is_named_where_it_is_whatever_the_chunks(chunk_elems):
    x = heavy((300, 1000))  # ragged tiles at both edges
    q, s = calibrated_quant(x, CalibSettings("max"))
    clean = compare("w", "f", q, s, x, BLOCK, chunk_elems=chunk_elems)
    whole = compare("w", "f", q, s, x, BLOCK, chunk_elems=1 << 24)  # one chunk: the numbers to match
    assert clean.wrong_elements == 0 and clean.maxae == whole.maxae and clean.max_err_rel_amax == whole.max_err_rel_amax
    assert clean.sqnr_db == pytest.approx(whole.sqnr_db, abs=1e-4) and clean.elements == 300 * 1000
    bad = q.clone()
    bits = bad.view(torch.uint8)
    bits[260, 700] ^= 0x01  # one step off
    bits[290, 999] = 0x7F  # NaN
    c = compare("w", "f", bad, s, x, BLOCK, chunk_elems=chunk_elems)
    assert c.wrong_elements == 2 and c.first_wrong.startswith("element [260, 700]: x "), c.first_wrong


def _cases():
    x = heavy((384, 1024))
    x[:128, :128] = 0  # an all-zero tile
    x[128, :64] = 1e-12  # flushed to zero
    tiny = gaussian((256, 512), seed=4)
    q_max, s_max = calibrated_quant(x, CalibSettings("max"))
    q_pct, s_pct = calibrated_quant(tiny, CalibSettings("percentile", percentile=50))  # clips half of each tile
    q_bf, s_bf = calibrated_quant(x, CalibSettings("max"), scale_dtype=torch.bfloat16)
    q_ue, s_ue = calibrated_quant(x, CalibSettings("max"), scale_fmt="ue8m0")
    ragged = heavy((300, 1000))
    q_rg, s_rg = calibrated_quant(ragged, CalibSettings("max"))
    experts = gaussian((2, 256, 384), seed=5)
    q_ex, s_ex = calibrated_quant(experts, CalibSettings("max"))
    row = gaussian((64, 384), seed=6)  # one scale per row (fp8-channel's layout)
    q_row, s_row = quant_fp8_channel(row)
    return {"max": (q_max, s_max, x, BLOCK), "percentile-clips": (q_pct, s_pct, tiny, BLOCK),
            "bf16-scales": (q_bf, s_bf, x, BLOCK), "ue8m0": (q_ue, s_ue, x, BLOCK),
            "ragged": (q_rg, s_rg, ragged, BLOCK), "3d": (q_ex, s_ex, experts, BLOCK),
            "per-row": (q_row, s_row, row, (1, 384))}


CASES = _cases()


@pytest.mark.parametrize("case", ["max", "percentile-clips", "bf16-scales", "ue8m0", "ragged", "3d", "per-row"])
@pytest.mark.parametrize("chunk_elems", [1 << 17, 128 * 256])
def test_the_exact_path_gives_the_element_by_element_numbers(case, chunk_elems, monkeypatch):
    """compare's fast path (whole tiles whose bytes are exactly the RNE cast) against its element-by-element
    judgement of the same chunks: the same counts and maxima, sums equal up to fp32 summation order."""
    from fp8norm import checks

    q, s, x, block = CASES[case]
    taken = []
    exact = checks._Sums._add_exact
    monkeypatch.setattr(checks._Sums, "_add_exact", lambda self, *a: taken.append(exact(self, *a)) or taken[-1])
    fast = compare("w", "f", q, s, x, block, chunk_elems=chunk_elems)
    assert any(taken) and (all(taken) or case == "ragged"), taken  # ragged edge chunks: element by element
    monkeypatch.setattr(checks._Sums, "_add_exact", lambda self, *a: False)
    slow = compare("w", "f", q, s, x, block, chunk_elems=chunk_elems)
    assert fast.wrong_elements == slow.wrong_elements == 0
    for f in ("elements", "clipped_frac", "flushed_frac", "maxae", "max_err_rel_amax", "status", "bands"):
        assert getattr(fast, f) == getattr(slow, f), f
    for f in ("rel_rms", "sqnr_db", "mae", "cos"):
        assert getattr(fast, f) == pytest.approx(getattr(slow, f), rel=1e-5), f
    if case == "percentile-clips":
        assert fast.clipped_frac == pytest.approx(0.5, abs=0.02) and fast.status == FAIL
    if case == "max":
        assert fast.flushed_frac >= 64 / x.numel()


def test_the_exact_path_leaves_a_wrong_byte_or_a_nan_source_to_the_element_check():
    x = gaussian((256, 256), seed=7)
    q, s = calibrated_quant(x, CalibSettings("max"))
    bad = q.clone()
    bad.view(torch.uint8)[200, 3] ^= 0x01
    c = compare("w", "f", bad, s, x, BLOCK)
    assert c.wrong_elements == 1 and c.first_wrong.startswith("element [200, 3]: x ")
    x_nan = x.clone()
    x_nan[5, 5] = float("nan")
    c = compare("w", "f", q, s, x_nan, BLOCK)
    assert c.wrong_elements == 1 and c.first_wrong.startswith("element [5, 5]: x nan") and c.status == FAIL


def test_clipping_half_of_each_tile_is_not_good():
    x = gaussian((256, 256))
    q, s = calibrated_quant(x, CalibSettings("percentile", percentile=50))
    c = compare("w", "f", q, s, x, BLOCK, Bands.for_calibration("percentile"))
    assert c.wrong_elements == 0  # correct rounding of a bad choice
    assert c.clipped_frac == pytest.approx(0.5, abs=0.02) and c.status == FAIL and c.bands["sqnr"] == FAIL


def test_double_rounding_allowed_only_when_requantized():
    x = gaussian((256, 256), seed=3)
    q1, s1 = calibrated_quant(x, CalibSettings("max"))
    from fp8norm import reference

    q2, s2 = reference.quant_fp8_block(q1, scale_fmt="ue8m0", x_scale_inv=s1)
    assert compare("w", "f", q2, s2, x, BLOCK).wrong_elements > 0  # not one rounding of x
    assert compare("w", "f", q2, s2, x, BLOCK, rounding_steps=1.5).wrong_elements == 0


def test_tensor_kind_and_per_layer():
    assert tensor_kind("model.layers.3.mlp.experts.7.up_proj.weight") == ("mlp.experts.up_proj", "3")
    assert tensor_kind("model.language_model.layers.0.self_attn.q_proj.weight") == ("self_attn.q_proj", "0")
    assert tensor_kind("lm_head.weight") == ("lm_head", None)
    assert tensor_kind("mtp.layers.0.self_attn.q_proj.weight") == ("self_attn.q_proj", "mtp.0")


# -- the command, on checkpoints -------------------------------------------------------------------

def test_clean_output_passes(clean, tmp_path):
    res = run(*clean, "--all", "--json", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["status"] == GOOD and report["problems"] == []
    assert report["checked"] == report["fp8_tensors"] == 32 and report["kept_tensors"] == 13
    for t in report["tensors"]:
        assert t["wrong_elements"] == 0 and t["clipped_frac"] == 0 and t["sqnr_db"] > 29.5, t
    assert "QUANTIZATION VERIFICATION SUMMARY" in res.output and "Correctly rounded   : 32 of 32" in res.output
    assert "\n  All 32 FP8 tensors checked: all GOOD.\n" in res.output and "RECOMMENDATIONS" not in res.output
    assert "check all" not in res.output  # nothing left to check


def _verdict(output: str) -> str:
    """The line between the report's last rule and its closing line."""
    lines = output.splitlines()
    return lines[lines.index("=" * 72, lines.index("  QUANTIZATION VERIFICATION SUMMARY") + 1) - 1]


def test_verdict_says_what_was_checked_and_how_to_check_all(clean):
    src, fp8 = clean
    res = run(src, fp8)  # 5 samples of the single shard's 32 FP8 tensors
    assert res.exit_code == 0, res.output
    assert _verdict(res.output) == "  Checked 5 of 32 FP8 tensors (sampled): all GOOD."
    assert res.output.endswith(f"{'=' * 72}\ncheck all fp8norm verify {src} {fp8} --all\n")
    res = run(src, fp8, "--samples", "0")
    assert res.exit_code == 0 and _verdict(res.output) == "  Nothing was checked: 0 of 32 FP8 tensors sampled."
    assert res.output.endswith(f"check all fp8norm verify {src} {fp8} --all\n")
    res = run(src, src)  # bf16 against itself: no FP8 tensor, so no verdict
    assert res.exit_code == 0
    assert _verdict(res.output) == "  Nothing was checked: no FP8 weight tensor to compare with the source."
    assert "GOOD." not in res.output and "check all" not in res.output


def test_writing_commands_say_what_they_checked(clean, tmp_path):
    src, fp8 = clean
    q = tmp_path / "q"
    res = CliRunner().invoke(main, ["quantize", str(src), str(q), "--skip-verify"])
    assert res.exit_code == 0, res.output
    assert "VERIFICATION" not in res.output and "GOOD" not in res.output
    assert res.output.endswith(f"wrote     {q}\n"
                               f"verify    nothing checked (--skip-verify); to check: fp8norm verify {src} {q}\n"
                               f"load      vllm serve {q}   (transformers: "
                               f'AutoModelForCausalLM.from_pretrained("{q}"))\n')
    bf16 = tmp_path / "bf16"
    res = CliRunner().invoke(main, ["convert", str(fp8), str(bf16), "--to", "bf16"])  # dequantizes: rounds nothing
    assert res.exit_code == 0, res.output
    assert "VERIFICATION" not in res.output and "GOOD" not in res.output
    assert res.output.endswith(f"wrote     {bf16}\nverify    nothing checked: no tensor was rounded anew (only "
                               f"those are compared with the source)\nload      vllm serve {bf16}   (transformers: "
                               f'AutoModelForCausalLM.from_pretrained("{bf16}"))\n')
    nv = tmp_path / "nv"
    res = CliRunner().invoke(main, ["convert", str(fp8), str(nv), "--to", "nvfp4"])
    assert res.exit_code == 0, res.output
    # NVFP4 is rounded anew, so checked after writing as the other formats are
    assert _verdict(res.output) == "  Checked 5 of 32 NVFP4 tensors (sampled): all GOOD."
    assert res.output.endswith(f"check all fp8norm verify {fp8} {nv} --all\n"
                               f"load      vllm serve {nv}   (NVFP4: a Blackwell GPU)\n")


def test_flipped_scale_fails_and_names_tensor(clean, tmp_path):
    name = "model.layers.1.mlp.experts.2.up_proj.weight"

    def edit(t):
        t[name + "_scale_inv"][1, 0] *= 4

    res = run(*corrupt(clean, tmp_path, edit), "--all")
    assert res.exit_code == EXIT_VERIFY_FAILED
    assert f"FAIL  {name}: " in res.output and "not RNE(x / scale), e.g. element [128, " in res.output
    assert "not a correct rounding of the source" in res.output


def test_slightly_changed_scale_fails(clean, tmp_path):
    name = "model.layers.0.self_attn.o_proj.weight"

    def edit(t):
        t[name + "_scale_inv"][0, 3] *= 1.01

    res = run(*corrupt(clean, tmp_path, edit), "--all")
    assert res.exit_code == EXIT_VERIFY_FAILED and f"FAIL  {name}: " in res.output


def test_changed_bytes_fail(clean, tmp_path):
    name = "model.layers.0.mlp.experts.3.down_proj.weight"

    def edit(t):
        b = t[name].view(torch.uint8)
        b[5, 17] ^= 0x01  # one mantissa bit of one element

    res = run(*corrupt(clean, tmp_path, edit), "--all")
    assert res.exit_code == EXIT_VERIFY_FAILED
    assert f"FAIL  {name}: 1 of {256 * 256} element(s) not RNE(x / scale), e.g. element [5, 17]" in res.output


def test_missing_scale_fails(clean, tmp_path):
    name = "model.layers.0.self_attn.o_proj.weight"
    res = run(*corrupt(clean, tmp_path, lambda t: t.pop(name + "_scale_inv")))
    assert res.exit_code == EXIT_VERIFY_FAILED
    assert f"tensor '{name}' is FP8 but has no {name}_scale_inv" in res.output


def test_swapped_tensors_fail(clean, tmp_path):
    a, b = "model.layers.0.mlp.experts.0.up_proj.weight", "model.layers.0.mlp.experts.1.up_proj.weight"

    def edit(t):
        for suffix in ("", "_scale_inv"):
            t[a + suffix], t[b + suffix] = t[b + suffix], t[a + suffix]

    res = run(*corrupt(clean, tmp_path, edit), "--all")
    assert res.exit_code == EXIT_VERIFY_FAILED
    assert f"FAIL  {a}:" in res.output and f"FAIL  {b}:" in res.output


def test_changed_kept_tensor_and_wrong_scale_shape_fail(clean, tmp_path):
    def edit(t):
        t["model.norm.weight"] = t["model.norm.weight"] + 1
        t["model.layers.1.self_attn.q_proj.weight_scale_inv"] = torch.ones(2, 2)

    res = run(*corrupt(clean, tmp_path, edit))
    assert res.exit_code == EXIT_VERIFY_FAILED
    assert "kept tensor 'model.norm.weight' differs from the source" in res.output
    assert "scale 'model.layers.1.self_attn.q_proj.weight_scale_inv' has shape [2, 2], expected [16, 2]" in res.output


def test_index_and_config_checks(clean, tmp_path):
    src, fp8 = clean
    bad = tmp_path / "bad"
    shutil.copytree(fp8, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    index["weight_map"].pop("lm_head.weight")
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    res = run(src, bad)
    assert res.exit_code == EXIT_VERIFY_FAILED and "'lm_head.weight'" in res.output
    assert "missing from the index" in res.output
    shutil.copy(fp8 / "model.safetensors.index.json", bad / "model.safetensors.index.json")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["modules_to_not_convert"].append("model.layers.0.self_attn.q_proj")
    cfg["quantization_config"]["scale_fmt"] = "ue8m0"
    (bad / "config.json").write_text(json.dumps(cfg))
    res = run(src, bad)
    assert res.exit_code == EXIT_VERIFY_FAILED
    assert "lists 'model.layers.0.self_attn.q_proj' in modules_to_not_convert, but it is FP8" in res.output
    assert "claims scale_fmt ue8m0" in res.output


def test_bands_are_configurable(clean):
    report = verify(*clean, samples=None, band_overrides={"sqnr_good": 40.0, "sqnr_warn": 35.0})
    assert report.status == FAIL and "nothing clipped" in report.format()
    res = run(*clean, "--sqnr-bands", "40,25")
    assert res.exit_code == 0 and "WARN" in res.output and "GOOD >= 40" in res.output
    assert _verdict(res.output) == ("  Checked 5 of 32 FP8 tensors (sampled): correct, but the format costs more "
                                    "than usual here: see above.")
    # the seed tool's absolute bands, on request
    res = run(*clean, "--cos-bands", "0.99999999,0.9999999")
    assert res.exit_code == EXIT_VERIFY_FAILED and "cosine (absolute)" in res.output
    assert run(*clean, "--cos-bands", "nope").exit_code == 2


def test_quantize_verifies_what_it_wrote(tmp_path):
    src = make_example(tmp_path / "src", "llama", "single")
    res = CliRunner().invoke(main, ["quantize", str(src), str(tmp_path / "o"), "--verify-samples", "3"])
    assert res.exit_code == 0 and "Checked             : 3" in res.output
    assert "verification" not in json.loads((tmp_path / "o" / "fp8norm.json").read_text())
    res = CliRunner().invoke(main, ["quantize", str(src), str(tmp_path / "p"), "--skip-verify"])
    assert res.exit_code == 0 and "VERIFICATION" not in res.output


def test_an_error_in_the_check_after_writing_is_the_runs_error_and_leaves_no_finished_output(tmp_path, monkeypatch):
    """One tensor's check of eight shards' failing (its tensors checked side by side) stops the run with
    that error; the index is not written, so the output does not pose as finished."""
    from fp8norm import verify as verify_module
    from fp8norm.quantize import quantize

    src = make_example(tmp_path / "src", "qwen3-moe", "sharded")
    real = verify_module._check_written_tensor

    def broken(plan, fmt, shard, infos, t, bands):
        if shard.startswith("model-00002-"):
            raise ValueError(f"{shard}: cannot read {t.name!r} back")
        return real(plan, fmt, shard, infos, t, bands)

    monkeypatch.setattr(verify_module, "_check_written_tensor", broken)
    with pytest.raises(ValueError, match="model-00002-of-00008.safetensors: cannot read"):
        quantize(src, tmp_path / "o", max_shard_size="1MB", verify_samples=2, progress=False)
    assert not (tmp_path / "o" / "model.safetensors.index.json").exists()


def test_quantize_exits_3_when_its_verification_fails(tmp_path):
    """rms k=1 clips a third of every tile: correct rounding, but the cost FAILs; the output stays,
    marked in fp8norm.json, and the recommendation is the real one (max clips nothing)."""
    src = make_example(tmp_path / "src", "llama", "single")
    res = CliRunner().invoke(main, ["quantize", str(src), str(tmp_path / "r"), "--calib", "rms", "--rms-factor", "1"])
    assert res.exit_code == EXIT_VERIFY_FAILED, res.output
    assert "FAIL: do not deploy" in res.output and "--calib rms clips up to" in res.output
    assert "--calib max clips nothing and is the cheapest (a larger --rms-factor clips less)" in res.output
    assert "same speed" not in res.output and "outliers are clipped" not in res.output
    prov = json.loads((tmp_path / "r" / "fp8norm.json").read_text())
    assert prov["verification"]["status"] == FAIL and prov["verification"]["exit_code"] == EXIT_VERIFY_FAILED
    assert prov["verification"]["failed_tensors"] and (tmp_path / "r" / "model.safetensors.index.json").exists()
    assert run(src, tmp_path / "r", "--all").exit_code == EXIT_VERIFY_FAILED


def test_plot_and_json_hold_the_same_numbers(clean, tmp_path):
    reader("matplotlib")
    res = run(*clean, "--all", "--json", tmp_path / "r.json", "--plot", tmp_path / "r.png")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((tmp_path / "r.json").read_text())
    by_kind = doc["sqnr_db_by_kind_and_layer"]
    assert set(by_kind) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                            "mlp.experts.gate_proj", "mlp.experts.up_proj", "mlp.experts.down_proj"}
    ups = [t for t in doc["tensors"] if tensor_kind(t["name"]) == ("mlp.experts.up_proj", "1")]
    pooled = -10 * math.log10(sum(t["rel_rms"] ** 2 for t in ups) / len(ups))
    assert by_kind["mlp.experts.up_proj"]["1"] == pytest.approx(pooled, abs=1e-3)


def test_plot_without_matplotlib_says_what_to_install(clean, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    res = run(*clean, "--plot", tmp_path / "r.png")
    assert res.exit_code == 1 and "pip install 'fp8norm[plot]'" in res.output and "Traceback" not in res.output
