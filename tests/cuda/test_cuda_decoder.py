"""The decoder engine on the check's device (CUDA on a GPU host) in bfloat16, against transformers
on the same weights in float32: greedy, mixed-task batches of every adapter kind, requests joining
mid-flight, the prompt-KV cache cold, warm and concurrent, and the PEFT prompt-tuning oracle."""

from __future__ import annotations

import pytest
import torch
from peft import PromptTuningConfig, TaskType, get_peft_model

from lamp_runtime.adapters import load_adapter
from lamp_runtime.bench.hf_engine import EngineConfig, engine_for
from lamp_runtime.prompts.prepared import assemble_embeddings, prepare
from lamp_runtime.requests import GenerationRequest, SamplingParams

from ..conftest import STAGGERED_CASES, run_staggered
from .checks import (BF16_TOLERANCE, DEVICE, FLOAT32_TOLERANCE, agreement, assert_greedy, decoder_logits,
                     needs_device)
from .conftest import load, vocab_prompt

pytestmark = [pytest.mark.cuda, needs_device]

CASES = STAGGERED_CASES


def requests():
    return [GenerationRequest(text, task, SamplingParams(max_new_tokens=n, ignore_eos=True)) for task, text, n in CASES]


def tokens(results):
    return [r.token_ids for r in results]


def embeddings(reference, adapter, text: str) -> torch.Tensor:
    """What the engine runs for one request: [soft prompt ; input embeddings (+ EPT offset)]."""
    ids = torch.tensor(reference.tokenizer(text)["input_ids"])
    return assemble_embeddings(prepare(adapter) if adapter is not None else None, reference.embed(ids).float().cpu())


def check_against_reference(reference, adapters, results, tolerance: float, what: str) -> list[list[int]]:
    """Each result greedy under the float32 reference (teacher forced); returns the reference's
    own `generate` continuations, for the agreement count."""
    generated = []
    for (task, text, n), result in zip(CASES, results):
        embeds = embeddings(reference, adapters.get(task), text)
        assert result.completion_tokens == n and result.finish_reason == "length"
        assert_greedy(decoder_logits(reference.model, embeds, result.token_ids), result.token_ids, tolerance,
                      f"{what}, task {task}, input {text!r}")
        with torch.no_grad():
            out = reference.model.generate(inputs_embeds=embeds.to(reference.device)[None],
                                           attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long,
                                                                     device=reference.device),
                                           max_new_tokens=n, do_sample=False)
        generated.append(out[0].tolist()[-n:])
    return generated


def engine(backbone, adapters, registry=None, **config):
    e = engine_for(backbone, registry=registry, config=EngineConfig(max_batch_size=8, **config))
    if registry is None:
        for task_id, adapter in adapters.items():
            e.registry.register(task_id, adapter)
    return e


def test_the_engine_runs_on_the_device_in_bfloat16(llama_bf16):
    e = engine_for(llama_bf16)
    assert llama_bf16.device.type == torch.device(DEVICE).type and llama_bf16.dtype == torch.bfloat16
    assert type(e).__name__ == "DecoderEngine" and e.kv.keys.device.type == llama_bf16.device.type


def test_bf16_mixed_batches_and_joiners_are_greedy_under_the_float32_reference(
        llama_bf16, llama_fp32, llama_adapters, record_property):
    e = engine(llama_bf16, llama_adapters)
    mixed = e.generate(requests())
    alone = [e.generate([r])[0] for r in requests()]
    joining = run_staggered(e, requests(), every=3)
    reference = check_against_reference(llama_fp32, llama_adapters, mixed, BF16_TOLERANCE, "bf16 mixed batch")
    check_against_reference(llama_fp32, llama_adapters, alone, BF16_TOLERANCE, "bf16 alone")
    for (task, text, _), ids in zip(CASES, joining):
        embeds = embeddings(llama_fp32, llama_adapters.get(task), text)
        assert_greedy(decoder_logits(llama_fp32.model, embeds, ids), ids, BF16_TOLERANCE, f"bf16 joining, {task}")
    assert [m.soft_prompt_tokens for m in mixed] == [8, 100, 4, 0, 5, 100, 6]
    record_property("bf16_mixed_equal_alone", agreement(tokens(mixed), tokens(alone)))
    record_property("bf16_joining_equal_alone", agreement(joining, tokens(alone)))
    record_property("bf16_equal_float32_generate", agreement(tokens(mixed), reference))


def test_float32_engine_on_the_device_matches_transformers_generate(llama_fp32, llama_adapters, record_property):
    mixed = engine(llama_fp32, llama_adapters).generate(requests())
    reference = check_against_reference(llama_fp32, llama_adapters, mixed, FLOAT32_TOLERANCE, "float32 mixed batch")
    record_property("float32_equal_generate", agreement(tokens(mixed), reference))


def test_prompt_kv_cold_warm_and_concurrent(llama_bf16, llama_fp32, llama_adapters, record_property):
    on = engine(llama_bf16, llama_adapters)
    off = engine(llama_bf16, llama_adapters, registry=on.registry, prompt_kv_cache_bytes=0)
    uncached = off.generate(requests())
    cold = on.generate(requests())
    stats = on.prompt_kv.stats()
    assert (stats.misses, stats.entries) == (5, 5)  # one build per task, reused within the batch
    warm = on.generate(requests())
    assert on.prompt_kv.stats().misses == 5 and on.prompt_kv.stats().hits >= 6
    assert tokens(warm) == tokens(cold)  # same batch, the same cached keys/values: the same arithmetic
    concurrent = run_staggered(on, requests(), every=2)
    for name, results in (("uncached", tokens(uncached)), ("cold", tokens(cold)), ("concurrent", concurrent)):
        for (task, text, _), ids in zip(CASES, results):
            embeds = embeddings(llama_fp32, llama_adapters.get(task), text)
            assert_greedy(decoder_logits(llama_fp32.model, embeds, ids), ids, BF16_TOLERANCE, f"{name}, {task}")
    assert on.prompt_kv.stats().pinned == 0 and on.cache.stats().pinned == 0
    record_property("prompt_kv_cold_equal_uncached", agreement(tokens(cold), tokens(uncached)))
    record_property("prompt_kv_concurrent_equal_cold", agreement(concurrent, tokens(cold)))


def test_a_warm_prefill_runs_only_the_input(llama_bf16, llama_adapters):
    on = engine(llama_bf16, llama_adapters)
    on.generate([GenerationRequest("Write a haiku about the sea:", "long", SamplingParams(max_new_tokens=1))])
    on.submit(GenerationRequest("Write a haiku about the sea:", "long", SamplingParams(max_new_tokens=1)))
    on.step()
    inputs = len(llama_bf16.tokenizer("Write a haiku about the sea:")["input_ids"])
    stats = on.last_step
    assert (stats.prompt_kv_hits, stats.prompt_tokens_reused, stats.prefill_tokens) == (1, 100, inputs)


INPUTS = ["The capital of France is", "My favourite food is", "Q: What is 2 + 2?\nA:"]
NEW_TOKENS = 12


def test_a_peft_checkpoint_matches_peft_generate(llama_folder, llama_bf16, tmp_path, record_property):
    """PEFT's own model is the oracle: its generate, and its forward teacher-forced on our tokens."""
    peft_model = get_peft_model(load(llama_folder, "float32").model,
                                PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=10,
                                                   token_dim=llama_bf16.hidden_size))
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(vocab_prompt(llama_bf16, 10, seed=7))
    peft_model.save_pretrained(tmp_path / "pt", safe_serialization=True)
    adapter = load_adapter(tmp_path / "pt", llama_bf16.hidden_size)
    device = llama_bf16.device
    ours = {}
    for dtype in ("bfloat16", "float32"):
        backbone = llama_bf16 if dtype == "bfloat16" else load(llama_folder, "float32")
        e = engine_for(backbone)
        e.registry.register("t", adapter)
        params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
        ours[dtype] = tokens(e.generate([GenerationRequest(t, "t", params) for t in INPUTS]))
    expected = []
    for text, bf16_ids, fp32_ids in zip(INPUTS, ours["bfloat16"], ours["float32"]):
        ids = llama_bf16.tokenizer(text, return_tensors="pt")["input_ids"].to(device)
        with torch.no_grad():
            out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                      do_sample=False)
        expected.append(out[0].tolist()[-NEW_TOKENS:])
        for name, ours_ids, tolerance in (("bf16", bf16_ids, BF16_TOLERANCE), ("float32", fp32_ids, FLOAT32_TOLERANCE)):
            fed = torch.cat([ids, torch.tensor([ours_ids[:-1]], device=device)], dim=1)
            with torch.no_grad():
                logits = peft_model(input_ids=fed, attention_mask=torch.ones_like(fed)).logits[0, -NEW_TOKENS:]
            assert_greedy(logits, ours_ids, tolerance, f"PEFT oracle, {name} engine, {text!r}")
    record_property("peft_float32_equal_generate", agreement(ours["float32"], expected))
    record_property("peft_bf16_equal_generate", agreement(ours["bfloat16"], expected))
