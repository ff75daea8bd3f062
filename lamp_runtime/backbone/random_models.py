"""Seeded random-weight backbones and a tokenizer built in process, for checks on hosts without a
model hub or checkpoints (the GPU check, `make gpu-check`): a Llama-template decoder of any shape
(a tiny one for the tests, Llama-2-7B's for the benchmark) and a tiny T5.

Random weights give degenerate text: what they check is that the engine computes what transformers
computes on the same weights, and how fast and in how much memory, never answer quality.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

# Llama-2-7B's shape (its config.json): 6.7 B parameters, 13.5 GB in bfloat16.
LLAMA_2_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                  intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
# Small enough for a CPU dry run in seconds; grouped-query attention (2 KV heads for 4) like
# current Llama-family models, so the slot cache's KV-head layout is exercised.
TINY_LLAMA = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=512, max_position_embeddings=1024, rms_norm_eps=1e-5)
SHAPES = {"7b": LLAMA_2_7B, "tiny": TINY_LLAMA}

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")


def byte_level_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer of exactly `vocab_size` ids, built without any file or training:
    4 special tokens, the 256 byte symbols, then merges of byte pairs in a fixed order. Any text
    round-trips; `</s>` is EOS, `<pad>` padding (T5's decoder start)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < len(SPECIAL_TOKENS) + len(alphabet):
        raise ValueError(f"vocab_size must be >= {len(SPECIAL_TOKENS) + len(alphabet)}, got {vocab_size}")
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *alphabet])}
    merges = []
    pairs = ((a, b) for a in alphabet for b in alphabet)
    while len(vocab) < vocab_size:
        a, b = next(pairs)
        vocab[a + b] = len(vocab)
        merges.append((a, b))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def llama_config(shape: dict, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(**shape, hidden_act="silu", tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@torch.no_grad()
def fill_random(model: torch.nn.Module, seed: int, std: float) -> None:
    """Overwrite every weight in place from one seeded generator on the weights' device: matrices
    ~ N(0, std), vectors (RMSNorm scales) 1. Same seed, device and dtype: same weights."""
    generator = None
    for _, param in sorted(model.named_parameters()):
        if generator is None:
            generator = torch.Generator(device=param.device).manual_seed(seed)
        if param.ndim == 1:
            param.fill_(1.0)
        else:
            param.normal_(0.0, std, generator=generator)


def random_llama(shape: dict, tokenizer, device: str, dtype: torch.dtype, seed: int = 0, std: float = 0.02):
    """A Llama-template causal LM of `shape` with seeded random weights, built directly on `device`
    in `dtype` (a 7B shape is never materialised on the CPU): modules are created under the device
    and dtype as from_pretrained creates them (rotary buffers stay float32), then filled."""
    from transformers import LlamaForCausalLM

    with _default_dtype(dtype), torch.device(device):
        model = LlamaForCausalLM(llama_config(shape, tokenizer))
    fill_random(model, seed, std)
    return model.eval().requires_grad_(False)


def _round_to_bfloat16(model: torch.nn.Module) -> None:
    """Keep float32 weights that bfloat16 represents exactly: a float32 reference and a bfloat16
    engine loaded from the same folder then hold the same weights, and differ only in arithmetic."""
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(torch.bfloat16).float())


def save_random_llama(folder, tokenizer, shape: dict = TINY_LLAMA, seed: int = 0, std: float = 0.1) -> Path:
    """A small random Llama saved as an HF folder (float32 holding bfloat16-exact values) with its
    tokenizer, loadable by `load_backbone(BackboneOptions(path=folder, ...))` in any dtype and
    quantization. A wider `std` than training inits gives peaked logits: greedy choices are clear."""
    model = random_llama(shape, tokenizer, "cpu", torch.float32, seed, std)
    _round_to_bfloat16(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def save_random_t5(folder, tokenizer, seed: int = 0) -> Path:
    """A small seeded random T5 (v1.0 layout, as tests/tiny_t5.py) saved with `tokenizer`, weights
    bfloat16-exact like save_random_llama's."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                      num_heads=4, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)
    model = T5ForConditionalGeneration(config)
    _round_to_bfloat16(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)
