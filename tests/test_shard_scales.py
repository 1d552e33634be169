"""`fp8norm shard` (both layouts) and `unshard` refuse corrupt scales as `convert` and `verify` do: a
NaN, Inf, 0 or negative block-FP8 `weight_scale_inv`, or the E8M0 NaN code 0xFF in an MX
`weight_scale`, is one `Error:` line naming the file and the tensor, before DST exists."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from fp8norm.examples import make_example
from fp8norm.kernels.numerics.mx import E8M0_NAN
from fp8norm.shard.mcore import rank_file
from tests.ckpt_utils import cli, one_line_error

SCALE_INV = "model.layers.0.self_attn.o_proj.weight_scale_inv"
MX_SCALE = "model.layers.0.self_attn.o_proj.weight_scale"
RANK_SCALE_INV = "decoder.layers.0.self_attention.linear_proj.weight_scale_inv"
SHARD = {"mcore": ["--layout", "mcore", "--tp", "2"], "deepseek": ["--layout", "deepseek", "--mp", "2"]}
FP8_WRONG = {"nan": float("nan"), "inf": float("inf"), "zero": 0.0, "negative": -1.0}
# what convert says of the same files (plan.check_fp8_sources, schemes.check_sources)
FP8_SAYS = "value(s) that are not finite and > 0"
MX_SAYS = "invalid value(s) (NaN, Inf or <= 0)"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard_scales")
    bf16 = make_example(root / "bf16", "qwen3-moe", "sharded")
    cli("quantize", bf16, root / "fp8", "--skip-verify")
    cli("quantize", bf16, root / "mxfp4", "--to", "mxfp4", "--skip-verify")
    cli("shard", root / "fp8", root / "mc", *SHARD["mcore"])
    return root


def corrupted(src, tmp_path, shard_file, name, value):
    """A copy of `src` whose tensor `name` (in `shard_file`) has its element [0, 0] set to `value`."""
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    path = bad / shard_file
    tensors = load_file(str(path))
    tensors[name][0, 0] = value
    save_file(tensors, str(path), metadata={"format": "pt"})
    return bad, path.name


def shard_of(root, name):
    return json.loads((root / "model.safetensors.index.json").read_text())["weight_map"][name]


@pytest.mark.parametrize("layout", ["mcore", "deepseek"])
@pytest.mark.parametrize("wrong", FP8_WRONG)
def test_shard_refuses_corrupt_block_fp8_scales(ckpts, tmp_path, layout, wrong):
    src = ckpts / "fp8"
    bad, file = corrupted(src, tmp_path, shard_of(src, SCALE_INV), SCALE_INV, FP8_WRONG[wrong])
    res = cli("shard", bad, tmp_path / "out", *SHARD[layout], ok=False)
    one_line_error(res, f"{file}: scale '{SCALE_INV}' holds 1 {FP8_SAYS}")
    assert not (tmp_path / "out").exists()
    # convert refuses the same file with the same line
    one_line_error(cli("convert", bad, tmp_path / "c", "--to", "bf16", ok=False), f"{file}: scale '{SCALE_INV}' holds 1 {FP8_SAYS}")


@pytest.mark.parametrize("layout", ["mcore", "deepseek"])
def test_shard_refuses_the_e8m0_nan_code(ckpts, tmp_path, layout):
    src = ckpts / "mxfp4"
    bad, file = corrupted(src, tmp_path, shard_of(src, MX_SCALE), MX_SCALE, E8M0_NAN)
    res = cli("shard", bad, tmp_path / "out", *SHARD[layout], ok=False)
    one_line_error(res, f"{file}: scale '{MX_SCALE}' holds 1 {MX_SAYS}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("wrong", FP8_WRONG)
def test_unshard_refuses_corrupt_rank_scales(ckpts, tmp_path, wrong):
    rank = rank_file(1, 0, 0, 1)
    bad, _ = corrupted(ckpts / "mc", tmp_path, rank, RANK_SCALE_INV, FP8_WRONG[wrong])
    # the shard run's digests catch the change first; rank files made elsewhere still get the scale check
    one_line_error(cli("unshard", bad, tmp_path / "back", ok=False), f"{rank}: its bytes differ from those the shard run wrote")
    res = cli("unshard", bad, tmp_path / "back", "--trust-rank-files", ok=False)
    one_line_error(res, f"scale '{rank}::{RANK_SCALE_INV}' holds 1 {FP8_SAYS}")
    assert not (tmp_path / "back").exists()


def test_unshard_refuses_the_e8m0_nan_code(ckpts, tmp_path):
    cli("shard", ckpts / "mxfp4", tmp_path / "mc", *SHARD["mcore"])
    rank = rank_file(0, 0, 0, 1)
    name = RANK_SCALE_INV.removesuffix("_inv")
    bad, _ = corrupted(tmp_path / "mc", tmp_path, rank, name, E8M0_NAN)
    res = cli("unshard", bad, tmp_path / "back", "--trust-rank-files", ok=False)  # past the digest check
    one_line_error(res, f"scale '{rank}::{name}' holds 1 {MX_SAYS}")
    assert not (tmp_path / "back").exists()
