"""Rough edges a first hour hits, each with its fix: shard infers the expert count or names the flag,
options of the other layout are refused, unshard on DeepSeek MP files gives a hint, activation stats
with max calibration are refused (not silently hashed), collect-stats on a stub tokenizer is one clear
line."""

import json

import pytest
from click.testing import CliRunner

from fp8norm.cli import main
from fp8norm.examples import make_example
from tests.ckpt_utils import cli
from tests.readers import reader


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    return make_example(tmp_path_factory.mktemp("ds") / "src", "deepseek-v3", "sharded")


def test_shard_deepseek_reads_the_expert_count_from_config(deepseek, tmp_path):
    cli("shard", deepseek, tmp_path / "mp", "--layout", "deepseek", "--mp", "2", "-q")
    layout = json.loads((tmp_path / "mp" / "fp8norm_parallel_layout.json").read_text())
    assert layout["n_experts"] == 4 and layout["expert_owner"] == {"0": 0, "1": 0, "2": 1, "3": 1}


def test_shard_deepseek_without_an_expert_count_names_the_flag(deepseek, tmp_path):
    src = tmp_path / "src"
    import shutil

    shutil.copytree(deepseek, src)
    cfg = json.loads((src / "config.json").read_text())
    del cfg["n_routed_experts"]
    (src / "config.json").write_text(json.dumps(cfg))
    res = cli("shard", src, tmp_path / "mp", "--layout", "deepseek", "--mp", "2", ok=False)
    assert res.exit_code == 1 and "pass --n-experts N" in res.output and "is a routed expert" in res.output
    cli("shard", src, tmp_path / "mp2", "--layout", "deepseek", "--mp", "2", "--n-experts", "4", "-q")


@pytest.mark.parametrize("layout,args,flag", [("mcore", ["--mp", "2"], "--mp"),
                                               ("deepseek", ["--mp", "2", "--tp", "2"], "--tp"),
                                               ("deepseek", ["--mp", "2", "--grouped-gemm"], "--grouped-gemm")])
def test_options_of_the_other_layout_are_refused(deepseek, tmp_path, layout, args, flag):
    res = cli("shard", deepseek, tmp_path / "o", "--layout", layout, *args, ok=False)
    assert res.exit_code == 2 and f"{flag} does not apply to --layout {layout}" in res.output
    assert not (tmp_path / "o").exists()


def test_unshard_on_deepseek_mp_files_gives_a_hint(deepseek, tmp_path):
    cli("shard", deepseek, tmp_path / "mp", "--layout", "deepseek", "--mp", "2", "-q")
    res = cli("unshard", tmp_path / "mp", tmp_path / "back", ok=False)
    assert res.exit_code == 1 and "holds DeepSeek model-parallel files (model0-mp2.safetensors" in res.output
    assert "--layout mcore" in res.output


def test_activation_stats_with_max_calibration_is_refused(tmp_path):
    src = make_example(tmp_path / "src", "llama", "single")
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"format": "fp8norm-activation-stats/1", "stat": "mean_square", "tokens": 1,
                                 "modules": {}}))
    for cmd in (["plan", str(src)], ["quantize", str(src), str(tmp_path / "o")]):
        res = CliRunner().invoke(main, [*cmd, "--activation-stats", str(stats)])
        assert res.exit_code == 1 and "--calib max (the tile amax) does not use it" in res.output
    assert not (tmp_path / "o").exists()


def test_collect_stats_on_a_stub_tokenizer_is_one_clear_line(tmp_path):
    reader("transformers")
    src = make_example(tmp_path / "src", "llama", "single")
    (src / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}}}))
    (tmp_path / "p.txt").write_text("hello\n")
    res = cli("collect-stats", src, "--prompts", tmp_path / "p.txt", "--out", tmp_path / "s.json", ok=False)
    assert res.exit_code == 1 and "its tokenizer cannot be loaded" in res.output
    assert "internal error" not in res.output and "Traceback" not in res.output
