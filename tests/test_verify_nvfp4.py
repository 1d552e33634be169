"""`fp8norm verify` and convert's own check on NVFP4 outputs, both layouts (ModelOpt: weight,
weight_scale, weight_scale_2; compressed-tensors nvfp4-pack-quantized: weight_packed, weight_scale,
weight_global_scale = 1 / scale_2), from bf16 and block FP8 sources: correct outputs GOOD and named
NVFP4 with NVFP4's own floor; a changed element or global scale FAIL naming the tensor."""

import json

import pytest
import torch

from fp8norm import reference
from fp8norm.kernels.numerics.e2m1 import e2m1_codes, pack_codes
from fp8norm.examples import make_example
from fp8norm import formats
from fp8norm.checks import GOOD, Bands, compare_nvfp4
from fp8norm.verify import EXIT_VERIFY_FAILED, NVFP4, SCHEME_FORMATS, verify
from tests.ckpt_utils import cli
from tests.test_verify_schemes import edited_copy

NVFP4_FORMAT = formats.get(NVFP4)

LAYOUTS = ["nvfp4", "nvfp4-ct"]
LINEAR = "model.language_model.layers.1.self_attn.q_proj"
FUSED = "model.language_model.layers.1.mlp.experts.gate_up_proj"  # ModelOpt keeps it 3D
EXPERT = "model.language_model.layers.1.mlp.experts.2.up_proj"  # compressed-tensors: per expert
# quantized weights the example holds: 17 2D linears and 6 fused 3D expert tensors (3 layers, gate_up
# and down), the latter written per expert and projection by compressed-tensors (4 experts x 3)
CHECKED = {"nvfp4": 17 + 6, "nvfp4-ct": 17 + 3 * 4 * 3}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify_nvfp4")
    bf16 = make_example(root / "bf16", "qwen3.5-moe", "sharded")
    cli("quantize", bf16, root / "fp8", "--skip-verify")
    return {"bf16": bf16, "fp8": root / "fp8"}, root


@pytest.fixture(scope="module")
def outputs(sources):
    srcs, root = sources
    outs = {}
    for source, src in srcs.items():
        for layout in LAYOUTS:
            # convert re-reads what it wrote and checks it (all of it here): before this, it skipped NVFP4
            res = cli("convert", src, root / f"{source}-{layout}", "--to", layout, "--verify-samples", "1000")
            assert f"\n  All {CHECKED[layout]} NVFP4 tensors checked: all GOOD.\n" in res.output, res.output
            outs[source, layout] = root / f"{source}-{layout}"
    return srcs, outs


@pytest.mark.parametrize("source", ["bf16", "fp8"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_correct_nvfp4_output_is_good_and_named(outputs, tmp_path, source, layout):
    srcs, outs = outputs
    res = cli("verify", srcs[source], outs[source, layout], "--all", "--json", tmp_path / "r.json")
    assert "is FP8 but has no" not in res.output and "Structure problems  : 0" in res.output
    assert f"  NVFP4 weight tensors: {CHECKED[layout]}\n" in res.output
    assert f"\n  All {CHECKED[layout]} NVFP4 tensors checked: all GOOD.\n" in res.output
    # NVFP4's floor (20.4 dB), not e4m3's 31.5
    assert "nvfp4 (e2m1) floor / bands" in res.output and "GOOD   20.4; GOOD >= 13.9, FAIL < 10.3" in res.output
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["scheme"] == "nvfp4" and doc["format"] == "NVFP4" and doc["floor"]["element_format"] == "e2m1"
    assert doc["floor"]["rel_rms"] == 0.0951 and doc["checked"] == CHECKED[layout]
    report = verify(srcs[source], outs[source, layout], samples=None)
    assert report.status == GOOD and all(c.wrong_elements == 0 for c in report.checks)
    names = {c.name for c in report.checks}
    assert ({LINEAR + ".weight", FUSED} if layout == "nvfp4" else {LINEAR, EXPERT}) <= names


def flip_first_sign(t):
    """The first element not +-0 with its sign flipped: never the rounding of x / scale."""
    flat = t.view(-1)
    i = int(((flat & 0x07) != 0).nonzero()[0])
    flat[i] ^= 0x08


@pytest.mark.parametrize("layout,tensor,name", [("nvfp4", FUSED, FUSED), ("nvfp4", LINEAR + ".weight", LINEAR + ".weight"),
                                               ("nvfp4-ct", EXPERT + ".weight_packed", EXPERT),
                                               ("nvfp4-ct", LINEAR + ".weight_packed", LINEAR)])
def test_changed_element_fails_naming_the_tensor(outputs, tmp_path, layout, tensor, name):
    srcs, outs = outputs
    bad = edited_copy(outs["fp8", layout], tmp_path, tensor, flip_first_sign)
    res = cli("verify", srcs["fp8"], bad, "--all", ok=False)
    assert res.exit_code == EXIT_VERIFY_FAILED and "FAIL: do not deploy this checkpoint." in res.output
    assert f"FAIL  {name}: 1 of " in res.output and "not RNE(x / scale)" in res.output


@pytest.mark.parametrize("layout,tensor", [("nvfp4", LINEAR + ".weight_scale_2"),
                                           ("nvfp4-ct", LINEAR + ".weight_global_scale")])
def test_changed_global_scale_fails(outputs, tmp_path, layout, tensor):
    srcs, outs = outputs
    bad = edited_copy(outs["bf16", layout], tmp_path, tensor, lambda g: g.mul_(2))
    res = cli("verify", srcs["bf16"], bad, "--all", ok=False)
    assert res.exit_code == EXIT_VERIFY_FAILED and f"FAIL  {LINEAR}" in res.output


def test_nan_group_scale_is_a_structure_problem_naming_it(outputs, tmp_path):
    srcs, outs = outputs
    bad = edited_copy(outs["bf16", "nvfp4"], tmp_path, LINEAR + ".weight_scale",
                      lambda s: s.view(torch.uint8).view(-1).__setitem__(0, 0x7F))
    res = cli("verify", srcs["bf16"], bad, "--all", ok=False)
    assert res.exit_code == EXIT_VERIFY_FAILED
    assert f"scale '{LINEAR}.weight_scale' holds invalid values (NaN, Inf or <= 0)" in res.output


def test_nvfp4_rounding_by_hand():
    """One group of 16, group scale 1.0 and scale_2 2.0 (divisor 2): x = 2 * (an e2m1 value) is stored
    exactly; x = 2.4 (y = 1.2) must be 1.0, not 1.5; 20 (y = 10) saturates to 6; 5 (y = 2.5) is a tie."""
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, -1.0, -3.0, -12.0, 2.4, 20.0, 0.1, -0.4, 5.0]])
    want = torch.tensor([[0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.5, -1.5, -6, 1.0, 6, 0, 0, 2.0]])
    packed = pack_codes(e2m1_codes(want))
    scale, scale_2 = torch.ones(1, 1).to(torch.float8_e4m3fn), torch.tensor(2.0)
    c = compare_nvfp4(NVFP4_FORMAT, "w", "s", packed, scale, scale_2, x)
    assert c.wrong_elements == 0
    wrong = want.clone()
    wrong[0, 11] = 1.5  # y = 1.2 is nearer 1
    c = compare_nvfp4(NVFP4_FORMAT, "w", "s", pack_codes(e2m1_codes(wrong)), scale, scale_2, x)
    assert c.wrong_elements == 1 and "element [0, 11]" in c.first_wrong and "RNE(x/scale) 1" in c.first_wrong
    odd_tie = want.clone()
    odd_tie[0, 15] = 3.0  # y = 2.5 is as near 3 as 2: RNE takes 2, the even code
    c = compare_nvfp4(NVFP4_FORMAT, "w", "s", pack_codes(e2m1_codes(odd_tie)), scale, scale_2, x)
    assert c.wrong_elements == 1 and "element [0, 15]" in c.first_wrong and "RNE(x/scale) 2" in c.first_wrong
    # and the twin's own output (its global amax 20: scale_2 = 20 / 2688) passes the same check
    packed_twin, ws, s2 = reference.quant_nvfp4(x)
    assert compare_nvfp4(NVFP4_FORMAT, "w", "s", packed_twin, ws, s2, x).wrong_elements == 0


def test_nvfp4_floor_on_gaussian_weights():
    """The floor in verify.py was measured this way: Gaussian weights of any scale sit on it, GOOD."""
    fmt = SCHEME_FORMATS[NVFP4]
    g = torch.Generator().manual_seed(3)
    for sigma in (0.02, 50.0):
        x = (torch.randn(512, 1024, generator=g) * sigma).bfloat16()
        c = compare_nvfp4(NVFP4_FORMAT, "w", "s", *reference.quant_nvfp4(x), x, Bands.for_format(NVFP4_FORMAT, "max"))
        assert c.status == GOOD and c.wrong_elements == 0 and abs(c.rel_rms / fmt.floor_rel_rms - 1) < 0.02
    assert Bands.for_format(NVFP4_FORMAT, None).sqnr_warn == 10.3
