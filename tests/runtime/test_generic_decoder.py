"""A decoder outside the Llama template (a small seeded random GPT-2) runs on the generic engine:
transformers' own forward and DynamicCache, rows merged with kv_batch. Its invariants are the slot
engine's: a mixed batch and requests joining mid-flight equal each request alone, and alone equals
transformers' `generate(inputs_embeds=...)`."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lamp_runtime.adapters import AdapterMeta, LampAdapter, SoftPromptAdapter
from lamp_runtime.backbone.hf import load_backbone
from lamp_runtime.backbone.options import BackboneOptions
from lamp_runtime.hf.engine import engine_for
from lamp_runtime.hf.generic_decoder import GenericDecoderEngine
from lamp_runtime.prompts.prepared import assemble_embeddings, prepare
from lamp_runtime.requests import GenerationRequest, SamplingParams

from ..conftest import run_staggered

WIDTH = 64
REQUESTS = [("plain", "hello world", 8), ("lamp", "the cat sat", 5), (None, "one two three", 7), ("lamp", "a b", 9)]


@pytest.fixture(scope="module")
def gpt2(backbone, tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("gpt2") / "tiny-gpt2"
    config = GPT2Config(vocab_size=len(backbone.tokenizer), n_embd=WIDTH, n_layer=2, n_head=4, n_positions=256,
                        bos_token_id=backbone.tokenizer.bos_token_id, eos_token_id=backbone.tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    backbone.tokenizer.save_pretrained(folder)
    return load_backbone(BackboneOptions(path=str(folder), dtype="float32", quantization="none", device="cpu"))


@pytest.fixture()
def engine(gpt2):
    g = torch.Generator().manual_seed(4)
    engine = engine_for(gpt2)
    engine.registry.register("plain", SoftPromptAdapter(AdapterMeta(), torch.randn(5, WIDTH, generator=g)))
    engine.registry.register("lamp", LampAdapter(AdapterMeta(pool=2), torch.randn(8, 3, generator=g),
                                                 torch.rand(3, generator=g) + 0.5, torch.randn(3, WIDTH, generator=g)))
    return engine


def requests():
    return [GenerationRequest(text, task, SamplingParams(max_new_tokens=n, ignore_eos=True)) for task, text, n in REQUESTS]


def test_a_gpt2_backbone_runs_on_the_generic_engine(engine):
    assert isinstance(engine, GenericDecoderEngine)


def test_mixed_and_joining_equal_alone_and_transformers(gpt2, engine):
    alone = [engine.generate([r])[0].token_ids for r in requests()]
    assert [r.token_ids for r in engine.generate(requests())] == alone
    assert run_staggered(engine, requests(), every=2) == alone
    for (task, text, n), tokens in zip(REQUESTS, alone):
        ids = torch.tensor(gpt2.tokenizer(text)["input_ids"])
        entry = engine.registry.get(task) if task else None
        embeds = assemble_embeddings(prepare(entry.adapter) if entry else None, gpt2.embed(ids))
        with torch.no_grad():
            out = gpt2.model.generate(inputs_embeds=embeds[None], attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long),
                                      max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        assert out[0].tolist() == tokens
