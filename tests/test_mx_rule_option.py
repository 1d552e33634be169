"""`--mx-rule` on `quantize` / `convert` (mxfp8, mxfp4): the E8M0 scale rule the output's bytes follow,
recorded in DST/fp8norm.json, covered by the resume fingerprint, and the one `fp8norm verify` checks
the scales against (fp8norm.kernels.numerics.mx: rceil by default, ocp, ct)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from fp8norm import reference
from tests.ckpt_utils import cli, one_line_error, read_dir

MODULE = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """Two bf16 linears whose block maxima have every mantissa, so the rules' codes differ."""
    root = tmp_path_factory.mktemp("mx_rule") / "src"
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    t = {f"model.layers.0.mlp.{p}.weight": (torch.randn(128, 256, generator=g) * 0.02).bfloat16()
         for p in ("down_proj", "up_proj")}
    save_file(t, str(root / "model.safetensors"))
    (root / "config.json").write_text("{}")
    return root


def provenance(dst):
    return json.loads((dst / "fp8norm.json").read_text())


@pytest.mark.parametrize("command,fmt,rule", [("quantize", "mxfp8", "ocp"), ("convert", "mxfp4", "ct"),
                                              ("quantize", "mxfp4", None)])
def test_rule_gives_the_twins_bytes_and_is_recorded(src, tmp_path, command, fmt, rule):
    args = (command, src, tmp_path / "o", "--to", fmt) + (("--mx-rule", rule) if rule else ())
    cli(*args)  # verified after writing with the recorded rule
    out, x = read_dir(tmp_path / "o"), read_dir(src)[MODULE + ".weight"]
    stored, scale = reference.quant_mx(x, fmt=fmt, rule=rule or "rceil")
    assert torch.equal(out[MODULE + ".weight_scale"], scale)
    assert torch.equal(out[MODULE + (".weight" if fmt == "mxfp8" else ".weight_packed")].view(torch.uint8),
                       stored.view(torch.uint8))
    assert provenance(tmp_path / "o")["mx_rule"] == (rule or "rceil")
    others = [r for r in ("rceil", "ocp", "ct") if r != (rule or "rceil")]
    assert all(not torch.equal(reference.quant_mx(x, fmt=fmt, rule=r)[1], scale) for r in others)


def test_verify_checks_the_recorded_rule(src, tmp_path):
    dst = tmp_path / "o"
    cli("quantize", src, dst, "--to", "mxfp8", "--mx-rule", "ocp", "-q")
    assert cli("verify", src, dst).exit_code == 0
    doc = provenance(dst)
    doc["mx_rule"] = "rceil"  # the bytes are ocp's: blocks with amax mantissa > 1.75 have the wrong code
    (dst / "fp8norm.json").write_text(json.dumps(doc))
    res = cli("verify", src, dst, ok=False)
    assert res.exit_code == 3 and "scale(s) not the MXFP8 rule's" in res.output and "(rceil)" in res.output
    del doc["mx_rule"]  # another tool's output: any rule's codes pass
    (dst / "fp8norm.json").write_text(json.dumps(doc))
    assert cli("verify", src, dst).exit_code == 0


def test_resume_refuses_another_rule_and_other_formats_refuse_it(src, tmp_path):
    args = ("quantize", src, tmp_path / "o", "--to", "mxfp4", "--skip-verify", "-q")
    cli(*args, "--mx-rule", "ocp")
    res = cli(*args, "--mx-rule", "ct", "--resume", ok=False)
    assert res.exit_code == 1 and "other settings" in res.output
    one_line_error(cli("quantize", src, tmp_path / "c", "--to", "fp8-channel", "--mx-rule", "ct", ok=False),
                   "--mx-rule applies to mxfp8 and mxfp4, not fp8-channel")
    one_line_error(cli("convert", src, tmp_path / "b", "--to", "fp8", "--mx-rule", "ct", ok=False),
                   "--mx-rule applies to mxfp8 and mxfp4, not fp8")
