"""`fp8norm shard` on fp8-channel / mxfp8 / mxfp4 checkpoints: not supported yet, so refused before
anything is written, in one line naming the scheme (before this, the deepseek layout wrote CT names
split as plain tensors, and mcore failed on a missing weight_scale_inv)."""

import pytest

from fp8norm.examples import make_example
from tests.ckpt_utils import cli, one_line_error

SCHEMES = ["fp8-channel", "mxfp8", "mxfp4"]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_example(tmp_path_factory.mktemp("shard_schemes") / "bf16", "qwen3-moe", "sharded")


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("layout", [["--layout", "deepseek", "--mp", "2"], ["--layout", "mcore", "--tp", "2"]])
def test_shard_refuses_scheme_checkpoints_in_one_line(src, tmp_path, scheme, layout):
    cli("quantize", src, tmp_path / "q", "--scheme", scheme)
    res = cli("shard", tmp_path / "q", tmp_path / "out", *layout, ok=False)
    one_line_error(res, f"{scheme} checkpoint (compressed-tensors): shard does not handle")
    assert not (tmp_path / "out").exists()


def test_shard_still_splits_block_fp8(src, tmp_path):
    cli("quantize", src, tmp_path / "q")
    cli("shard", tmp_path / "q", tmp_path / "out", "--layout", "mcore", "--tp", "2")
    assert (tmp_path / "out").is_dir()
