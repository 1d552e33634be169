"""Calibration modes against hand-checkable tiles, their guarantees, and the CLI wiring."""

import json
import math

import pytest
import torch
from click.testing import CliRunner

from fp8norm import reference
from fp8norm.kernels.numerics import fp8_block as nx
from fp8norm.calibrate import CalibSettings, calibrated_quant
from fp8norm.cli import main
from fp8norm.examples import make_example
from fp8norm.verify import EXIT_VERIFY_FAILED
from tests.ckpt_utils import read_dir, same_bytes, save_tiny_qwen3
from tests.readers import reader

F32 = torch.float32


def outlier_tile():
    x = torch.ones(128, 128)
    x[3, 5] = 100.0
    return x


def dequant(q, s):
    return reference.dequant_fp8_block(q, s, out_dtype=F32)


def test_max_keeps_the_outlier_exact():
    q, s = calibrated_quant(outlier_tile(), CalibSettings("max"))
    assert s.item() == torch.tensor(100.0 / 448, dtype=F32).item() or s.item() == (torch.tensor(100.0) / 448).item()
    assert q.float()[3, 5].item() == 448.0
    assert dequant(q, s)[3, 5].item() == pytest.approx(100.0, rel=1e-6)


def test_rms_saturates_the_outlier():
    q, s = calibrated_quant(outlier_tile(), CalibSettings("rms", rms_factor=3.0))
    c = 3.0 * math.sqrt((16383 * 1.0 + 100.0**2) / 16384)  # k * rms, by hand
    assert s.item() == pytest.approx(c / 448, rel=1e-6)
    assert q.float()[3, 5].item() == 448.0  # saturated: the outlier comes back as 448 * sf = c
    assert dequant(q, s)[3, 5].item() == pytest.approx(c, rel=1e-6)
    # the ones land on 448/c = 117.7..., between e4m3 neighbours 112 and 120: 120
    assert q.float()[0, 0].item() == 120.0


def test_percentile_clips_at_the_bulk():
    q, s = calibrated_quant(outlier_tile(), CalibSettings("percentile", percentile=99.9))
    assert s.item() == torch.tensor(1.0 / 448, dtype=F32).item()  # rank ceil(0.999 * 16384) is a 1.0
    assert q.float()[3, 5].item() == 448.0 and q.float()[0, 0].item() == 448.0


def test_mse_picks_the_best_factor_of_a_tiny_grid():
    """Grid {1, 0.75, 0.5}; one 1.0 and 16383 values of 0.74 (hand-computed squared errors):
    a=1:    sf=1/448, 0.74 -> 331.5 -> 320 -> 0.7143, err 0.0257^2 * 16383 = 10.8
    a=0.75: sf=0.75/448, 1.0 saturates to 0.75 (0.0625), 0.74 -> 442 -> 448 -> 0.75, 1e-4 * 16383 = 1.70
    a=0.5:  both saturate to 0.5: 0.0625 + 0.0576 * 16383 = 943
    so 0.75 wins."""
    x = torch.full((128, 128), 0.74)
    x[0, 0] = 1.0
    q, s = calibrated_quant(x, CalibSettings("mse", mse_grid=3))
    assert s.item() == (torch.tensor(0.75) / 448).item()
    assert (q.float() == 448.0).all()
    err = {a: None for a in (1.0, 0.75, 0.5)}
    for a in err:
        sf = torch.tensor(a) / 448
        deq = nx.saturate_e4m3(x / sf).float() * sf
        err[a] = float((deq - x).square().sum())
    assert min(err, key=err.get) == 0.75
    assert err[1.0] == pytest.approx(16383 * (0.74 - 320 / 448) ** 2, rel=1e-3)


def _tile_sq_err(x, q, s):
    d = (dequant(q, s) - x).square()
    m, n = x.shape
    return torch.stack([d[i:i + 128, j:j + 128].sum() for i in range(0, m, 128) for j in range(0, n, 128)])


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_mse_never_worse_than_max(scale_dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 260, generator=g) * torch.exp(torch.randn(300, 1, generator=g))
    x[7, 9] = 40.0
    e_max = _tile_sq_err(x, *calibrated_quant(x, CalibSettings("max"), scale_dtype=scale_dtype))
    e_mse = _tile_sq_err(x, *calibrated_quant(x, CalibSettings("mse", mse_grid=20), scale_dtype=scale_dtype))
    assert (e_mse <= e_max).all()
    assert (e_mse < e_max).any()


def test_activation_weights_move_error_to_quiet_channels():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 256, generator=g)
    x[:, 1::2] *= 4  # loud and quiet columns interleaved
    loud = torch.zeros(256, dtype=torch.bool)
    loud[::2] = True  # the quiet-valued columns carry large activations
    w = torch.where(loud, 100.0, 0.01)
    plain = dequant(*calibrated_quant(x, CalibSettings("mse", mse_grid=30)))
    weighted = dequant(*calibrated_quant(x, CalibSettings("mse", mse_grid=30), act_weights=w))
    e_plain, e_w = (plain - x).square(), (weighted - x).square()
    assert e_w[:, loud].sum() < e_plain[:, loud].sum()
    assert e_w[:, ~loud].sum() > e_plain[:, ~loud].sum()
    # weighted rms follows the loud channels' magnitude (here the small-valued ones): a tighter threshold
    _, s_plain = calibrated_quant(x, CalibSettings("rms"))
    _, s_w = calibrated_quant(x, CalibSettings("rms"), act_weights=w)
    assert (s_w < s_plain).all()


@pytest.mark.parametrize("mode", ["rms", "percentile", "mse"])
def test_3d_experts_and_ue8m0(mode):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(3, 200, 130, generator=g) * 0.02).to(torch.bfloat16)
    calib = CalibSettings(mode, mse_grid=5)
    q, s = calibrated_quant(x, calib, scale_fmt="ue8m0", scale_dtype=torch.float8_e8m0fnu)
    assert q.shape == x.shape and s.shape == (3, 2, 2) and s.dtype == torch.float8_e8m0fnu
    assert nx.is_power_of_two(s)
    # each expert calibrated on its own: the same as calibrating the 2D slices one by one
    for e in range(3):
        q2, s2 = calibrated_quant(x[e], calib, scale_fmt="ue8m0", scale_dtype=torch.float8_e8m0fnu)
        assert same_bytes(q[e], q2) and same_bytes(s[e], s2)
    # the pow2 scale is the float calibrated one rounded up: never smaller
    _, s_float = calibrated_quant(x, calib)
    assert (s.float() >= s_float).all() and (s.float() < 2 * s_float).all()


def test_bad_settings_and_nonfinite():
    with pytest.raises(ValueError):
        CalibSettings("avg")
    with pytest.raises(ValueError):
        CalibSettings("rms", rms_factor=0)
    x = torch.randn(130, 130)
    x[129, 1] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite .* tile index \(1, 0\)"):
        calibrated_quant(x, CalibSettings("rms"))
    with pytest.raises(ValueError, match="channels"):
        calibrated_quant(torch.randn(130, 130), CalibSettings("rms"), act_weights=torch.ones(5))


def test_quantize_records_and_applies_calibration(tmp_path):
    src = make_example(tmp_path / "src", "llama", "single")
    res = CliRunner().invoke(main, ["quantize", str(src), str(tmp_path / "o"), "--calib", "rms", "--rms-factor",
                                    "4.5", "--scale-fmt", "ue8m0"])
    # the example's outlier input channels lie beyond 4.5 x rms: rms clips them, and verify says so
    assert res.exit_code == EXIT_VERIFY_FAILED and "--calib rms clips up to" in res.output, res.output
    assert "Calibration         : rms(k=4.5)" in res.output
    prov = json.loads((tmp_path / "o" / "fp8norm.json").read_text())
    assert prov["calibration"] == {"mode": "rms", "rms_factor": 4.5} and prov["scale_fmt"] == "ue8m0"
    src_t, out_t = read_dir(src), read_dir(tmp_path / "o")
    name = "model.layers.1.mlp.down_proj.weight"
    q, s = calibrated_quant(src_t[name], CalibSettings("rms", rms_factor=4.5), scale_fmt="ue8m0")
    assert same_bytes(out_t[name], q) and same_bytes(out_t[name + "_scale_inv"], s)
    plan = CliRunner().invoke(main, ["plan", str(src), "--calib", "mse", "--mse-grid", "7"]).output
    assert "calibration mse(grid=7)" in plan


def _tiny_qwen3_with_tokenizer(path):
    transformers = reader("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["the", "cat", "sat", "on", "a", "mat", "fp8", "scales", "<unk>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    save_tiny_qwen3(path)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)
    return path


def test_collect_stats_then_weighted_quantize(tmp_path):
    model = _tiny_qwen3_with_tokenizer(tmp_path / "m")
    (tmp_path / "prompts.txt").write_text("the cat sat on a mat\nfp8 scales on the mat\n")
    res = CliRunner().invoke(main, ["collect-stats", str(model), "--prompts", str(tmp_path / "prompts.txt"),
                                    "--out", str(tmp_path / "stats.json")])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "stats.json").read_text())
    assert doc["format"] == "fp8norm-activation-stats/1" and doc["tokens"] == 11
    assert len(doc["modules"]["model.layers.0.mlp.down_proj"]) == 512
    assert len(doc["modules"]["model.layers.1.self_attn.q_proj"]) == 256
    assert all(v >= 0 for v in doc["modules"]["model.layers.0.mlp.down_proj"])
    args = ["quantize", str(model), str(tmp_path / "o"), "--calib", "mse", "--mse-grid", "8"]
    res = CliRunner().invoke(main, args + ["--activation-stats", str(tmp_path / "stats.json")])
    assert res.exit_code == 0, res.output
    src_t, out_t = read_dir(model), read_dir(tmp_path / "o")
    name = "model.layers.0.mlp.down_proj.weight"
    w = torch.tensor(doc["modules"]["model.layers.0.mlp.down_proj"])
    q, s = calibrated_quant(src_t[name], CalibSettings("mse", mse_grid=8), act_weights=w)
    assert same_bytes(out_t[name], q) and same_bytes(out_t[name + "_scale_inv"], s)
    prov = json.loads((tmp_path / "o" / "fp8norm.json").read_text())
    assert prov["activation_stats_sha256"] and prov["calibration"]["mode"] == "mse"
