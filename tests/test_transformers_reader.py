"""A real reader: transformers (>= 5) loads what fp8norm wrote, on CPU, and the model still works.

Tiny Qwen3 and Qwen3-MoE models are built from small configs with random weights (no download),
saved in bf16, quantized by `fp8norm quantize`, and loaded with AutoModelForCausalLM, which
dequantizes FP8 block weights to bf16 on CPU (dims are multiples of 128, as it requires there).
Tolerance on the logits: cosine similarity >= 0.99 and max |diff| <= 10% of max |logit|.
"""

import pytest
import torch
from click.testing import CliRunner

from fp8norm import reference
from fp8norm.cli import main
from tests.ckpt_utils import read_dir
from tests.readers import reader

transformers = reader("transformers")


def _tiny(kind):
    common = dict(vocab_size=512, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, tie_word_embeddings=False)
    if kind == "qwen3":
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(intermediate_size=512, **common))
    cfg = transformers.Qwen3MoeConfig(intermediate_size=512, moe_intermediate_size=128, num_experts=4,
                                      num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], **common)
    return transformers.Qwen3MoeForCausalLM(cfg)


@pytest.mark.parametrize("kind", ["qwen3", "qwen3-moe"])
def test_transformers_loads_fp8_output(tmp_path, kind):
    torch.manual_seed(0)
    model = _tiny(kind).to(torch.bfloat16).eval()
    model.save_pretrained(tmp_path / "bf16")
    res = CliRunner().invoke(main, ["quantize", str(tmp_path / "bf16"), str(tmp_path / "fp8")])
    assert res.exit_code == 0, res.output
    written = read_dir(tmp_path / "fp8")
    assert written["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn

    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp8", dtype=torch.bfloat16).eval()
    # transformers' dequantized weight equals fp8norm's own dequantization of the written bytes
    name = "model.layers.1.mlp.down_proj.weight" if kind == "qwen3" else "model.layers.0.self_attn.o_proj.weight"
    mine = reference.dequant_fp8_block(written[name], written[name + "_scale_inv"], out_dtype=torch.bfloat16)
    theirs = loaded.get_parameter(name)
    assert theirs.dtype == torch.bfloat16 and torch.equal(theirs, mine)
    # kept tensors arrive unchanged
    assert torch.equal(loaded.get_parameter("lm_head.weight"), model.get_parameter("lm_head.weight"))

    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_logits = model(ids).logits.float()
        fp8_logits = loaded(ids).logits.float()
    cos = torch.nn.functional.cosine_similarity(ref_logits.flatten(), fp8_logits.flatten(), dim=0)
    assert cos >= 0.99
    assert (ref_logits - fp8_logits).abs().max() <= 0.1 * ref_logits.abs().max()
    # and quantization changed something (the test can fail)
    assert not torch.equal(ref_logits, fp8_logits)
