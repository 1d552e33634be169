"""The built-in examples look like real checkpoints: transformers loads them, their tokenizer is real,
collect-stats runs on every one, their weights have heavy tails and outlier channels, and the
README's first command prints a clean report."""

import json

import pytest
import torch
from click.testing import CliRunner

from fp8norm.cli import main
from fp8norm.examples import FAMILIES, family_tensors, make_example
from tests.ckpt_utils import cli, read_dir
from tests.readers import reader


@pytest.mark.parametrize("family", FAMILIES)
def test_collect_stats_on_every_example(family, tmp_path):
    transformers = reader("transformers")
    src = make_example(tmp_path / "src", family, "sharded")
    tok = transformers.AutoTokenizer.from_pretrained(src)
    ids = tok("The quick brown fox").input_ids
    assert ids and max(ids) < 512 and tok.decode(ids) == "The quick brown fox"  # a real BPE, round trip
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello, world! How are you today?\nWeights are quantized to eight-bit floating point.\n")
    res = cli("collect-stats", src, "--prompts", prompts, "--out", tmp_path / "stats.json")
    doc = json.loads((tmp_path / "stats.json").read_text())
    assert doc["tokens"] > 10 and "wrote stats of" in res.output
    tensors = read_dir(src)
    # every hooked module is a weight of the checkpoint, with one statistic per input channel
    for module, values in doc["modules"].items():
        w = tensors.get(module + ".weight")
        if w is not None:
            assert len(values) == w.shape[-1], module
    assert sum(m + ".weight" in tensors for m in doc["modules"]) >= 6
    res = cli("quantize", src, tmp_path / "fp8", "--calib", "mse", "--mse-grid", "4", "--activation-stats",
              tmp_path / "stats.json", "-q")
    assert "Correctly rounded" in res.output


def test_transformers_reads_the_examples_weights(tmp_path):
    transformers = reader("transformers")
    src = make_example(tmp_path / "src", "llama", "single")
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    t = read_dir(src)
    assert torch.equal(model.model.layers[1].self_attn.k_proj.weight, t["model.layers.1.self_attn.k_proj.weight"])
    assert model.config.num_attention_heads == 16 and model.config.num_key_value_heads == 8


def test_weights_are_heavy_tailed_with_outlier_channels():
    t = family_tensors("llama")
    w = t["model.layers.0.mlp.up_proj.weight"].float()  # [512, 256]
    z = (w / w.std()).flatten()
    kurtosis = float((z ** 4).mean())
    assert kurtosis > 6  # Gaussian: 3
    col_rms = w.square().mean(0).sqrt()
    outliers = (col_rms > 5 * col_rms.median()).sum().item()
    assert 1 <= outliers <= 256 // 32  # a few input channels, the same in every row
    assert 0.9 < float(t["model.norm.weight"].float().mean()) < 1.1


def test_sizes_allow_model_parallel_and_aligned_fp8():
    for family in FAMILIES:
        for name, x in family_tensors(family).items():
            if x.dim() >= 2 and ("self_attn" in name or "mlp" in name) and "gate.weight" not in name \
                    and "shared_expert_gate" not in name and "kv_a_proj" not in name:
                assert x.shape[-1] % 128 == 0 and x.shape[-2] % 128 == 0, (family, name, x.shape)


def test_first_command_output_is_clean(tmp_path):
    """README's first commands: make-example, quantize; the report is GOOD with no WARN, no
    recommendation, and no 0.00 GB/s."""
    runner = CliRunner()
    res = runner.invoke(main, ["make-example", str(tmp_path / "bf16")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["quantize", str(tmp_path / "bf16"), str(tmp_path / "fp8")])
    assert res.exit_code == 0, res.output
    # 23 FP8 tensors in one shard, 5 re-read: the verdict says so, then how to check all and to load
    bf16, fp8 = tmp_path / "bf16", tmp_path / "fp8"
    assert res.output.endswith(f"  Checked 5 of 23 FP8 tensors (sampled): all GOOD.\n{'=' * 72}\n"
                               f"wrote     {fp8}\n"
                               f"check all fp8norm verify {bf16} {fp8} --all\n"
                               f"load      vllm serve {fp8}   (transformers: "
                               f'AutoModelForCausalLM.from_pretrained("{fp8}"))\n'), res.output
    for bad in ("WARN  ", "  FAIL  ", "FAIL:", "NOT GOOD", "RECOMMENDATIONS", "0.00 GB/s", "Traceback"):
        assert bad not in res.output, bad
