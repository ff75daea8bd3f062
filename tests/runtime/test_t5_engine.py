"""The encoder-decoder path on a small seeded random T5 (tests/tiny_t5.py). The invariants are
the decoder's: a mixed-task batch equals each request alone, and both equal a direct
transformers `generate(inputs_embeds=...)` on the encoder side.
"""

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from lamp_runtime.adapters import AdapterMeta, EptAdapter, LampAdapter, SoftPromptAdapter
from lamp_runtime.backbone.hf import load_backbone
from lamp_runtime.backbone.options import BackboneOptions
from lamp_runtime.hf.engine import engine_for
from lamp_runtime.hf.seq2seq import Seq2SeqEngine
from lamp_runtime.prompts.prepared import prepare
from lamp_runtime.requests import GenerationRequest, SamplingParams

from ..conftest import assert_bitsandbytes_linears, run_staggered
from ..tiny_t5 import D_MODEL, build_tiny_t5

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def t5(backbone, tmp_path_factory):
    folder = build_tiny_t5(tmp_path_factory.mktemp("t5") / "tiny-t5", backbone.tokenizer)
    return load_backbone(BackboneOptions(path=str(folder), dtype="float32", quantization="none", device="cpu"))


@pytest.fixture(scope="module")
def tasks():
    g = torch.Generator().manual_seed(5)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    return {
        "plain": SoftPromptAdapter(AdapterMeta(), randn(6, D_MODEL)),
        "lamp": LampAdapter(AdapterMeta(pool=3), randn(10, 4), randn(4).abs() + 0.5, randn(4, D_MODEL)),
        "ept": EptAdapter(AdapterMeta(), randn(3, D_MODEL), randn(4, 2), randn(2, D_MODEL)),
    }


REQUESTS = [("plain", "translate English to German: hello"), ("lamp", "summarize: the cat sat on the mat"),
            ("ept", "question: why is the sky blue?"), (None, "hello world"), ("lamp", "a b c"),
            ("plain", "one more request with a longer input than the others")]


def t5_engine(t5, tasks):
    engine = engine_for(t5)
    for task_id, adapter in tasks.items():
        engine.registry.register(task_id, adapter)
    return engine


def reference(t5, adapter, text):
    ids = t5.tokenizer(text, return_tensors="pt")["input_ids"][0]
    inputs = t5.embed(ids)
    if adapter is not None:
        prepared = prepare(adapter)
        if prepared.offset is not None:
            n = min(len(ids), prepared.offset.shape[0])
            inputs = torch.cat([inputs[:n] + prepared.offset[:n], inputs[n:]])
        inputs = torch.cat([prepared.prompt, inputs])
    with torch.no_grad():
        out = t5.model.generate(inputs_embeds=inputs[None], attention_mask=torch.ones(1, inputs.shape[0], dtype=torch.long),
                                max_new_tokens=NEW_TOKENS, do_sample=False)
    return [t for t in out[0].tolist()[1:] if t != t5.tokenizer.pad_token_id]


def test_make_engine_picks_seq2seq(t5, tasks):
    assert isinstance(t5_engine(t5, tasks), Seq2SeqEngine)


def test_mixed_batch_equals_alone_and_transformers_reference(t5, tasks):
    engine = t5_engine(t5, tasks)
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    make = lambda: [GenerationRequest(text, task, params) for task, text in REQUESTS]  # noqa: E731
    alone = [engine.generate([r])[0] for r in make()]
    mixed = engine.generate(make())
    assert [m.token_ids for m in mixed] == [a.token_ids for a in alone]
    expected = [reference(t5, tasks.get(task), text) for task, text in REQUESTS]
    eos = t5.tokenizer.eos_token_id
    assert [a.token_ids for a in alone] == [[t for t in e if t != eos] for e in expected]
    assert [m.soft_prompt_tokens for m in mixed] == [6, 4, 3, 0, 4, 6]


def test_requests_joining_mid_flight_form_new_cohorts(t5, tasks):
    engine = t5_engine(t5, tasks)
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    requests = [GenerationRequest(text, task, params) for task, text in REQUESTS]
    alone = [engine.generate([GenerationRequest(r.input, r.task_id, params)])[0].token_ids for r in requests]
    assert run_staggered(engine, requests, every=2) == alone
    assert engine.cache.stats().pinned == 0 and not engine.has_work()


def test_abort_in_a_cohort(t5, tasks):
    engine = t5_engine(t5, tasks)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)  # nobody finishes early by chance
    keep = GenerationRequest("a b c", "lamp", params)
    drop = GenerationRequest("x y z", "plain", params)
    engine.submit(keep)
    engine.submit(drop)
    finished = {out.request_id: out.result for out in engine.step() if out.finished}
    assert not finished
    engine.abort(drop.request_id)
    while engine.has_work():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.result
    assert finished[drop.request_id].finish_reason == "abort"
    assert finished[keep.request_id].token_ids == engine.generate([GenerationRequest("a b c", "lamp", keep.params)])[0].token_ids


def assert_mixed_batch_equals_generate(t5_backbone, tasks):
    engine = t5_engine(t5_backbone, tasks)
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    mixed = engine.generate([GenerationRequest(text, task, params) for task, text in REQUESTS])
    eos = t5_backbone.tokenizer.eos_token_id
    expected = [reference(t5_backbone, tasks.get(task), text) for task, text in REQUESTS]
    assert [m.token_ids for m in mixed] == [[t for t in e if t != eos] for e in expected]


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_quantized_t5_batches_mixed_tasks_like_its_own_generate(t5, tasks, quantization):
    """bitsandbytes on the T5 linears (the tiny model is mostly embeddings, so sizes barely move):
    the engine on the quantized model equals transformers' generate on that same model."""
    quantized = load_backbone(BackboneOptions(path=t5.options.path, dtype="float32", quantization=quantization,
                                              device="cpu"))
    assert quantized.options.quantization == quantization
    # q, k, v, o (+ cross-attention) and wi of 2 + 2 blocks; transformers keeps T5's `wo` in float
    assert assert_bitsandbytes_linears(quantized.model, quantization) == 2 * 5 + 2 * 9
    assert_mixed_batch_equals_generate(quantized, tasks)


def test_t5_v1_1_style_backbone_batches_like_its_own_generate(backbone, tasks, tmp_path):
    """T5 v1.1 / Flan-T5 shape: gated-GELU feed-forward, and a config saying the LM head is untied,
    which transformers 5 maps to "no d_model**-0.5 rescaling of the decoder output"; loaded
    through the same `--backbone PATH`."""
    torch.manual_seed(1)
    config = T5Config(vocab_size=len(backbone.tokenizer), d_model=D_MODEL, d_kv=16, d_ff=96, num_layers=2,
                      num_decoder_layers=2, num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                      pad_token_id=backbone.tokenizer.pad_token_id, eos_token_id=backbone.tokenizer.eos_token_id,
                      decoder_start_token_id=backbone.tokenizer.pad_token_id)
    folder = tmp_path / "tiny-t5-v1_1"
    T5ForConditionalGeneration(config).save_pretrained(folder)
    backbone.tokenizer.save_pretrained(folder)
    v1_1 = load_backbone(BackboneOptions(path=str(folder), dtype="float32", quantization="none", device="cpu"))
    assert v1_1.model.config.scale_decoder_outputs is False
    assert_mixed_batch_equals_generate(v1_1, tasks)
