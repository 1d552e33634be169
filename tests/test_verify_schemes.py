"""`fp8norm verify` and quantize's own verification on fp8-channel, mxfp8 and mxfp4 outputs
(compressed-tensors layouts, fused experts written per expert): correct outputs GOOD, a changed
element or scale FAIL naming the module; the MX scale rule and the e2m1 rounding check by hand."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fp8norm.kernels.numerics import mx
from fp8norm import reference
from fp8norm.examples import make_example
from fp8norm import formats
from fp8norm.checks import E4M3, FAIL, GOOD, WARN, Bands, compare_scheme, rne_mismatch
from fp8norm.verify import EXIT_VERIFY_FAILED, SCHEME_FORMATS, verify

# each format named in the report, not "FP8" (which is block FP8's)
LABELS = {"fp8-channel": "FP8 per-channel", "mxfp8": "MXFP8", "mxfp4": "MXFP4"}
FLOORS_DB = {"fp8-channel": "31.5", "mxfp8": "30.7", "mxfp4": "18.9"}
from tests.ckpt_utils import cli

SCHEMES = ["fp8-channel", "mxfp8", "mxfp4"]
E2M1 = SCHEME_FORMATS["mxfp4"]
EXPERT = "model.language_model.layers.1.mlp.experts.2.up_proj"  # from a fused 3D gate_up_proj
LINEAR = "model.language_model.layers.0.mlp.shared_expert.down_proj"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify_schemes")
    src = make_example(root / "bf16", "qwen3.5-moe", "sharded")
    outs = {}
    for scheme in SCHEMES:
        res = cli("quantize", src, root / scheme, "--to", scheme, "--max-shard-size", "2MB")
        # quantize's own verification ran on these schemes, and found them correct; it counts the
        # quantized tensors as verify does (per module: fused experts one per expert)
        assert "Correctly rounded" in res.output, res.output
        label = LABELS[scheme]
        verdict = re.search(rf"\n  (?:Checked \d+ of (\d+) {label} tensors \(sampled\)|All (\d+) {label} tensors checked): "
                            r"all GOOD\.\n", res.output)
        assert verdict, res.output
        assert int(verdict[1] or verdict[2]) == verify(src, root / scheme, samples=0).fp8_tensors
        outs[scheme] = root / scheme
    return src, outs


def edited_copy(out, tmp_path, tensor, edit):
    """A copy of `out` with the shard holding `tensor` rewritten after `edit(that tensor)` (in place)."""
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    shard = bad / json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"][tensor]
    tensors = load_file(str(shard))
    edit(tensors[tensor])
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return bad


@pytest.mark.parametrize("scheme", SCHEMES)
def test_correct_scheme_output_is_good(outputs, scheme):
    src, outs = outputs
    res = cli("verify", src, outs[scheme], "--all")
    report = verify(src, outs[scheme], samples=None)
    assert f"\n  All {len(report.checks)} {LABELS[scheme]} tensors checked: all GOOD.\n" in res.output
    assert f"\n  {LABELS[scheme] + ' weight tensors':<20}: {report.fp8_tensors}\n" in res.output
    # the format's own floor, named with its scheme (MXFP4's e2m1 is not NVFP4's)
    assert f"   {scheme} ({SCHEME_FORMATS[scheme].name}) floor / bands\n" in res.output
    assert f"   GOOD   {FLOORS_DB[scheme]}; GOOD >= " in res.output
    assert report.scheme == scheme and not report.problems
    # every quantized module checked: 17 2D linears + 2 fused expert layers and MTP, 4 experts x 3 projections
    assert len(report.checks) == report.fp8_tensors == 17 + 3 * 4 * 3
    assert all(c.wrong_elements == c.wrong_scales == 0 for c in report.checks)
    assert {EXPERT, LINEAR} <= {c.name for c in report.checks}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("module", [EXPERT, LINEAR])
def test_changed_element_fails_naming_the_module(outputs, tmp_path, scheme, module):
    src, outs = outputs
    packed = scheme == "mxfp4"

    def edit(t):
        flat = t.view(torch.uint8).view(-1)
        # the first element not +-0, sign flipped: never the rounding of x / scale
        i = int(((flat & (0x07 if packed else 0x7F)) != 0).nonzero()[0])
        flat[i] ^= 0x08 if packed else 0x80

    bad = edited_copy(outs[scheme], tmp_path, module + (".weight_packed" if packed else ".weight"), edit)
    res = cli("verify", src, bad, "--all", ok=False)
    assert res.exit_code == EXIT_VERIFY_FAILED
    assert f"FAIL  {module}: 1 of " in res.output and "not RNE(x / scale)" in res.output


@pytest.mark.parametrize("scheme", SCHEMES)
def test_changed_scale_fails_naming_the_module(outputs, tmp_path, scheme):
    src, outs = outputs

    def edit(s):
        if scheme == "fp8-channel":
            s[3, 0] *= 2
        else:
            s[3, 1] += 1  # the block's E8M0 code one up: X doubled

    bad = edited_copy(outs[scheme], tmp_path, EXPERT + ".weight_scale", edit)
    res = cli("verify", src, bad, "--all", ok=False)
    assert res.exit_code == EXIT_VERIFY_FAILED and f"FAIL  {EXPERT}: " in res.output
    if scheme != "fp8-channel":
        assert f"scale(s) not the {scheme.upper()} rule's, e.g. scale block [3, 1]" in res.output


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4"])
def test_mx_scale_rule_either_rule_accepted_another_code_fails(fmt):
    """Hand-computed: a block whose amax is 1.875 (mantissa >= 1.75) gets 2^(0 - emax) under the OCP rule
    and 2^(1 - emax) under compressed-tensors' and rceil; elements requantized for a third code are correctly
    rounded for that code, but the code is neither rule's."""
    emax = mx.mx_format(fmt).emax
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(4, 64, generator=g) * 2 - 1).mul_(0.9)
    x[:, 0] = 1.875  # amax of each first block
    x = x.bfloat16()
    ocp = reference.quant_mx(x, fmt=fmt, rule="ocp")
    ct = reference.quant_mx(x, fmt=fmt, rule="ct")
    assert int(ocp[1][0, 0]) == 127 - emax and int(ct[1][0, 0]) == 128 - emax  # the two rules, by hand
    for stored, scale in (ocp, ct):
        c = compare_scheme(formats.get(fmt), "w", "s", stored, scale, x)
        assert c.wrong_elements == c.wrong_scales == 0 and c.status != FAIL
    # code 129 - emax: elements rounded for X = 4 * 2^-emax, but no rule gives that code for amax 1.875
    scale = ocp[1].clone()
    scale[0, 0] = 129 - emax
    stored = ocp[0].clone()
    stored_fix = mx.encode_elements(x.float()[0:1, :32] / (4.0 * 2.0 ** -emax), mx.mx_format(fmt))
    if fmt == "mxfp8":
        stored[0, :32] = stored_fix[0]
    else:
        stored[0, :16] = stored_fix[0]
    c = compare_scheme(formats.get(fmt), "w", "s", stored, scale, x)
    assert c.wrong_elements == 0 and c.wrong_scales == 1 and c.status == FAIL
    assert (f"code {129 - emax}, block amax 1.875 gives {128 - emax} (rceil) or {127 - emax} (ocp) or {128 - emax} (ct)"
            in c.first_wrong_scale)
    # with the rule the output records, only that rule's codes pass
    c = compare_scheme(formats.get(fmt), "w", "s", *ocp, x, mx_rule="rceil")
    assert c.wrong_scales >= 4 and c.status == FAIL  # every first block, and second blocks with amax mantissa > max
    assert c.first_wrong_scale == f"scale block [0, 0]: code {127 - emax}, block amax 1.875 gives {128 - emax} (rceil)"


def test_e2m1_rounding_by_hand():
    """E2M1 values 0, 0.5, 1, 1.5, 2, 3, 4, 6 (OCP MX spec v1.0, table 5): half a step is 0.25 below 2,
    0.5 in [2, 4), 1 in [4, 6]; saturation at 6."""
    y = torch.tensor([[0.2, 0.3, 2.4, 5.0, 7.0, 100.0, -1.2]])
    good = torch.tensor([[0.0, 0.5, 2.0, 4.0, 6.0, 6.0, -1.0]])
    one = torch.ones_like(y)
    assert not rne_mismatch(good, y, one, fmt=E2M1).any()
    wrong = torch.tensor([[0.5, 0.0, 3.0, 6.0 - 2.0, 4.0, 4.0, -1.5]])
    # 0.2 -> 0.5 is 0.3 away; 0.3 -> 0 is 0.3; 2.4 -> 3 is 0.6; 5 -> 4 is a tie (fine); 7 and 100 must be 6
    assert rne_mismatch(wrong, y, one, fmt=E2M1).tolist() == [[True, True, True, False, True, True, True]]
    # and e4m3's rule would call the e2m1 grid wrong: the formats are judged apart
    assert rne_mismatch(good, y, one, fmt=E4M3).any()


def test_mxfp4_bands_bound_correct_rounding():
    """An adversarial but correct MXFP4 block (compressed-tensors' rule: amax 3.5 X, 31 elements that
    flush to 0) costs rel RMS sqrt((0.5^2 + 31 * 0.249^2) / (3.5^2 + 31 * 0.249^2)) = 0.39: WARN, never
    FAIL (the bound is 0.47 = 6.56 dB); Gaussian weights sit on the floor, GOOD."""
    x = torch.full((1, 32), 0.249)
    x[0, 0] = 3.5
    stored, scale = reference.quant_mx(x, fmt="mxfp4", rule="ct")
    assert int(scale[0, 0]) == 127  # X = 1
    c = compare_scheme(formats.get("mxfp4"), "w", "s", stored, scale, x, Bands.for_format(formats.get("mxfp4"), "max"))
    assert c.wrong_elements == 0 and c.status == WARN and abs(c.rel_rms - 0.39) < 0.01
    g = (torch.randn(256, 512, generator=torch.Generator().manual_seed(1)) * 0.02).bfloat16()
    c = compare_scheme(formats.get("mxfp4"), "w", "s", *reference.quant_mx(g, fmt="mxfp4"), g, Bands.for_format(formats.get("mxfp4"), "max"))
    assert c.status == GOOD and abs(c.rel_rms / E2M1.floor_rel_rms - 1) < 0.05


@pytest.fixture(scope="module")
def from_fp8(outputs, tmp_path_factory):
    src, _ = outputs
    root = tmp_path_factory.mktemp("verify_schemes_fp8")
    cli("quantize", src, root / "fp8")
    return src, root / "fp8", root


@pytest.mark.parametrize("scheme", SCHEMES)
def test_converted_from_block_fp8_is_checked_against_the_dequantized_source(from_fp8, scheme):
    bf16, fp8, root = from_fp8
    cli("convert", fp8, root / scheme, "--to", scheme)
    report = verify(fp8, root / scheme, samples=None)
    assert report.status == GOOD and not report.problems and len(report.checks) == 17 + 3 * 4 * 3
    # against the bf16 model: not the values it was rounded from (FP8's), so not a correct rounding
    assert verify(bf16, root / scheme, samples=None).status == FAIL


@pytest.mark.parametrize("scheme", SCHEMES)
def test_missing_scale_is_a_structure_problem_naming_it(outputs, tmp_path, scheme):
    src, outs = outputs
    bad = tmp_path / "bad"
    shutil.copytree(outs[scheme], bad)
    index_path = bad / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = EXPERT + ".weight_scale"
    shard = bad / index["weight_map"].pop(name)
    tensors = load_file(str(shard))
    removed = tensors.pop(name)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index["metadata"]["total_size"] -= removed.numel() * removed.element_size()
    index_path.write_text(json.dumps(index))
    res = cli("verify", src, bad, "--all", ok=False)
    assert res.exit_code == EXIT_VERIFY_FAILED and "Structure problems  : 0" not in res.output
    assert "FAIL  " in res.output and EXPERT in res.output
