"""Fixtures of the CUDA checks: a tiny seeded random Llama and T5 saved as HF folders with an
in-process byte-level tokenizer (no hub, no embedded GGUF: the GPU host has neither), loaded
through `load_backbone` as users load theirs, on the check's device."""

from __future__ import annotations

import pytest
import torch

from lamp_runtime.adapters import AdapterMeta, EptAdapter, LampAdapter, SoftPromptAdapter
from lamp_runtime.backbone.hf import load_backbone
from lamp_runtime.backbone.options import BackboneOptions
from lamp_runtime.backbone.random_models import TINY_LLAMA, byte_level_tokenizer, save_random_llama, save_random_t5

from .checks import DEVICE


@pytest.fixture(scope="session")
def tokenizer():
    return byte_level_tokenizer(TINY_LLAMA["vocab_size"])


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory, tokenizer):
    return save_random_llama(tmp_path_factory.mktemp("llama") / "tiny-llama", tokenizer)


def load(folder, dtype: str, quantization: str = "none"):
    return load_backbone(BackboneOptions(path=str(folder), dtype=dtype, quantization=quantization, device=DEVICE))


@pytest.fixture(scope="session")
def llama_bf16(llama_folder):
    return load(llama_folder, "bfloat16")


@pytest.fixture(scope="session")
def llama_fp32(llama_folder):
    """The reference: the same weights in float32 on the same device."""
    return load(llama_folder, "float32")


def vocab_prompt(backbone, length: int, seed: int) -> torch.Tensor:
    """Rows of the input-embedding table (the usual prompt-tuning init), on the host in float32."""
    weight = backbone.model.get_input_embeddings().weight
    index = torch.randint(0, weight.shape[0], (length,), generator=torch.Generator().manual_seed(seed))
    return weight[index.to(weight.device)].detach().float().cpu().clone()


def lamp_from_prompt(prompt: torch.Tensor, rank: int, pool: int) -> LampAdapter:
    u, s, vh = torch.linalg.svd(prompt, full_matrices=False)
    return LampAdapter(AdapterMeta(pool=pool), u[:, :rank].contiguous(), s[:rank].contiguous(), vh[:rank].contiguous())


@pytest.fixture(scope="session")
def llama_adapters(llama_fp32):
    """Every adapter kind, pooled prompts of 8, 6, 4, 5 (+ EPT offset) and 100 tokens."""
    g = torch.Generator().manual_seed(21)
    hidden = llama_fp32.hidden_size
    return {
        "plain": SoftPromptAdapter(AdapterMeta(), vocab_prompt(llama_fp32, 8, seed=1)),
        "lamp2": lamp_from_prompt(vocab_prompt(llama_fp32, 12, seed=2), rank=8, pool=2),
        "lamp3": lamp_from_prompt(vocab_prompt(llama_fp32, 10, seed=3), rank=6, pool=3),
        "ept": EptAdapter(AdapterMeta(), vocab_prompt(llama_fp32, 5, seed=4), torch.randn(6, 2, generator=g) * 0.05,
                          torch.randn(2, hidden, generator=g) * 0.05),
        "long": lamp_from_prompt(vocab_prompt(llama_fp32, 100, seed=5), rank=8, pool=1),
    }


@pytest.fixture(scope="session")
def t5_folder(tmp_path_factory, tokenizer):
    return save_random_t5(tmp_path_factory.mktemp("t5") / "tiny-t5", tokenizer)
