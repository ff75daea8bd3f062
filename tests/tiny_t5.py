"""A small seeded random T5 saved as an HF folder (no T5 weights are reachable here).

Its tokenizer is the embedded backbone's: any tokenizer works for a random model. Used by the T5
engine, training, `lamp generate` and `lamp serve` tests.
"""

from __future__ import annotations

import torch
from transformers import T5Config, T5ForConditionalGeneration

D_MODEL = 64


def build_tiny_t5(folder, tokenizer):
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=D_MODEL, d_kv=16, d_ff=128, num_layers=2,
                      num_decoder_layers=2, num_heads=4, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
