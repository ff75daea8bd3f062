"""The decoder engine's prompt-KV cache and slot KV cache, on the real embedded backbone (fp32).

A task's soft prompt is computed once per version and reused: greedy answers must be token for
token those computed without the cache, cold (first request of a task), warm, in mixed batches of
every adapter kind and prompt length, and for requests joining mid-flight.
"""

from __future__ import annotations

import pytest
import torch

from lamp_runtime.adapters import AdapterMeta, EptAdapter, SoftPromptAdapter
from lamp_runtime.engine.base import EngineConfig
from lamp_runtime.hf.engine import engine_for
from lamp_runtime.hf.decoder import DecoderEngine
from lamp_runtime.hf.kv_slots import KVSlots
from lamp_runtime.requests import GenerationRequest, SamplingParams

from ..conftest import STAGGERED_CASES, lamp_from_prompt, run_staggered, vocab_prompt

CASES = STAGGERED_CASES


@pytest.fixture(scope="module")
def adapters(backbone, task_adapters):
    g = torch.Generator().manual_seed(21)
    ept = EptAdapter(AdapterMeta(), vocab_prompt(backbone, 5, seed=22), torch.randn(6, 2, generator=g) * 0.05,
                     torch.randn(2, backbone.hidden_size, generator=g) * 0.05)
    long = lamp_from_prompt(vocab_prompt(backbone, 200, seed=23), rank=8, pool=1)  # 200 served tokens
    return {**task_adapters, "ept": ept, "long": long}


def engines(backbone, adapters, **config):
    on = engine_for(backbone, config=EngineConfig(max_batch_size=8, **config))
    off = engine_for(backbone, registry=on.registry, config=EngineConfig(max_batch_size=8, prompt_kv_cache_bytes=0))
    for task_id, adapter in adapters.items():
        on.registry.register(task_id, adapter)
    return on, off


def requests():
    return [GenerationRequest(text, task, SamplingParams(max_new_tokens=n)) for task, text, n in CASES]


def tokens(results):
    return [r.token_ids for r in results]


def test_the_builder_picks_the_slot_engine_for_a_llama_backbone(backbone):
    assert isinstance(engine_for(backbone), DecoderEngine)


def test_cold_warm_mixed_and_joining_answers_equal_the_uncached_ones(backbone, adapters):
    on, off = engines(backbone, adapters)
    expected = tokens(off.generate(requests()))
    assert all(expected) and on.prompt_kv.stats().entries == 0
    cold = tokens(on.generate(requests()))
    stats = on.prompt_kv.stats()
    assert (stats.misses, stats.entries) == (5, 5)  # one build per task version, reused within the batch
    assert cold == expected
    assert tokens(on.generate(requests())) == expected  # warm: every prompt from the cache
    assert run_staggered(on, requests(), every=2) == expected
    assert [tokens(on.generate([r]))[0] for r in requests()] == expected
    assert on.prompt_kv.stats().pinned == 0 and on.cache.stats().pinned == 0


def test_a_warm_prefill_runs_only_the_input(backbone, adapters):
    on, _ = engines(backbone, adapters)
    request = GenerationRequest("Write a haiku about the sea:", "long", SamplingParams(max_new_tokens=1))
    on.generate([request])
    on.submit(GenerationRequest("Write a haiku about the sea:", "long", SamplingParams(max_new_tokens=1)))
    on.step()
    stats = on.last_step
    inputs = len(backbone.tokenizer("Write a haiku about the sea:")["input_ids"])
    assert (stats.prompt_kv_hits, stats.prompt_tokens_reused, stats.prefill_tokens) == (1, 200, inputs)
    assert stats.prefill_forwards == 1


def test_the_cache_is_bounded_by_bytes_and_evicts_least_recent(backbone, adapters):
    per_token = engine_for(backbone).kv.bytes_per_position()
    on, off = engines(backbone, adapters, prompt_kv_cache_bytes=201 * per_token)  # room for the 200-token one
    for task in ("long", "plain", "long"):
        request = GenerationRequest("Hello there", task, SamplingParams(max_new_tokens=4))
        assert tokens(on.generate([request])) == tokens(off.generate([request]))
        assert on.prompt_kv.stats().bytes <= 201 * per_token
    stats = on.prompt_kv.stats()
    assert (stats.misses, stats.evictions, stats.entries) == (3, 2, 1)


def test_a_new_version_never_reuses_the_old_prompt_kv(backbone, adapters):
    on, off = engines(backbone, adapters)
    request = lambda: GenerationRequest("The weather today", "swap", SamplingParams(max_new_tokens=8))  # noqa: E731
    old = on.registry.register("swap", adapters["plain"])
    first = tokens(on.generate([request()]))
    new = on.registry.register("swap", SoftPromptAdapter(AdapterMeta(), vocab_prompt(backbone, 8, seed=99)))
    on.discard(old.cache_key)  # what the store sync does when a version is replaced
    assert old.cache_key not in on.prompt_kv and old.cache_key not in on.cache
    second = tokens(on.generate([request()]))
    assert new.cache_key in on.prompt_kv and second == tokens(off.generate([request()])) and second != first


def test_a_task_with_an_empty_input_still_answers(backbone, adapters):
    on, off = engines(backbone, adapters)
    request = lambda: GenerationRequest("", "long", SamplingParams(max_new_tokens=5))  # noqa: E731
    assert tokens(on.generate([request()])) == tokens(off.generate([request()]))


def test_kv_slots_grow_move_and_release():
    kv = KVSlots(layers=2, slots=8, kv_heads=3, head_dim=4, dtype=torch.float32, chunk=4)
    kv.reserve(1, 3, used_slots=0, used_positions=0)
    assert (kv.slots, kv.capacity) == (1, 4)
    keys = torch.arange(2 * 3 * 4, dtype=torch.float32).view(1, 2, 3, 4)  # [R=1, N=2, heads, dim]
    for layer in range(2):
        kv.write(layer, kv.flat_positions(torch.tensor([0]), torch.tensor([[0, 1]])), keys + layer, -keys)
    assert torch.equal(kv.keys[1, 0, :, :2], (keys + 1)[0].transpose(0, 1))
    kv.reserve(3, 9, used_slots=1, used_positions=2)  # grows to 4 slots (doubling), 12 positions (chunks)
    assert (kv.slots, kv.capacity) == (4, 12) and torch.equal(kv.keys[1, 0, :, :2], (keys + 1)[0].transpose(0, 1))
    kv.move(0, 2, 2)
    assert torch.equal(kv.keys[:, 2, :, :2], kv.keys[:, 0, :, :2]) and torch.equal(kv.values[:, 2], kv.values[:, 0])
    with pytest.raises(ValueError, match="9 KV slots asked for, 8 at most"):
        kv.reserve(9, 1, used_slots=0, used_positions=0)
    kv.release_memory()
    assert kv.nbytes == 0
