#!/usr/bin/env python
"""Build the examples' tokenizer (developer script; its output ships in fp8norm/data/tokenizer/).

A byte-level BPE of 512 tokens (the examples' vocab_size) trained with `tokenizers` on a little
English text, saved by transformers' PreTrainedTokenizerFast.save_pretrained, so the files are what
a real Hugging Face checkpoint holds (tokenizer.json, tokenizer_config.json):

    python tools/make_tokenizer.py fp8norm/data/tokenizer
"""

import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

VOCAB = 512
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = """\
The quick brown fox jumps over the lazy dog. A language model reads text as tokens and predicts the next one.
Weights are stored in bfloat16 and quantized to eight-bit floating point with one scale per block of 128 by 128.
Calibration chooses each block's scale; the maximum keeps every value, clipping trades outliers for resolution.
Hello, world! How are you today? I am fine, thank you. What is the capital of France? Paris is the capital.
def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i * i)\n
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828. Questions, answers, and summaries of long documents.
"""


def build() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT] * 20, trainer=trainer)
    return tok


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "fp8norm/data/tokenizer")
    fast = PreTrainedTokenizerFast(tokenizer_object=build(), bos_token=None, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", model_max_length=4096)
    fast.save_pretrained(out)
    # the class name transformers 4 and 5 (and vLLM, SGLang through them) all load
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    print(f"{out}: vocab {fast.vocab_size} + {len(fast.added_tokens_decoder)} special")


if __name__ == "__main__":
    main()
