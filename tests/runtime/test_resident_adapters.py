"""Adapters registered by reference (`StoredAdapterRef`): the engine loads their factors when a
request needs them, into a byte-bounded cache, and gives the same answers as with the factors
registered directly."""

from __future__ import annotations

import pytest

from lamp_runtime.adapters.stored import StoredAdapterRef
from lamp_runtime.engine.base import EngineConfig
from lamp_runtime.hf.decoder import DecoderEngine
from lamp_runtime.errors import AdapterError, UnservableTaskError
from lamp_runtime.requests import GenerationRequest, SamplingParams

from ..conftest import lamp_from_prompt, vocab_prompt

PARAMS = SamplingParams(max_new_tokens=6)


class CountingLoad:
    """The `load` of a reference: counts the reads (a store read in a replica)."""

    def __init__(self, adapter):
        self.adapter, self.calls = adapter, 0

    def __call__(self):
        self.calls += 1
        return self.adapter


def by_reference(adapter, load=None) -> StoredAdapterRef:
    return StoredAdapterRef.of(adapter, load or CountingLoad(adapter))


@pytest.fixture(scope="module")
def adapters(backbone):
    return {f"t{i}": lamp_from_prompt(vocab_prompt(backbone, 12, seed=40 + i), rank=4, pool=2) for i in range(5)}


def test_answers_equal_those_of_the_factors_registered_directly(backbone, adapters):
    direct = DecoderEngine(backbone, config=EngineConfig(max_batch_size=8))
    lazy = DecoderEngine(backbone, config=EngineConfig(max_batch_size=8))
    for task, adapter in adapters.items():
        direct.registry.register(task, adapter)
        lazy.registry.register_stored(task, by_reference(adapter))
    requests = [GenerationRequest("The sea is", task, PARAMS) for task in adapters]
    assert [r.text for r in lazy.generate(requests)] == [r.text for r in direct.generate(requests)]
    result = lazy.generate([GenerationRequest("The sea is", "t1", PARAMS)])[0]
    assert result.soft_prompt_tokens == adapters["t1"].pooled_tokens == 6


def test_the_factors_in_memory_stay_within_their_budget(backbone, adapters):
    one = next(iter(adapters.values())).host_bytes
    engine = DecoderEngine(backbone, config=EngineConfig(max_batch_size=8, adapter_cache_bytes=2 * one))
    loads = {task: CountingLoad(adapter) for task, adapter in adapters.items()}
    for task, adapter in adapters.items():
        engine.registry.register_stored(task, by_reference(adapter, loads[task]))
    for task in ["t0", "t1", "t0", "t2", "t3", "t4", "t0"]:
        engine.generate([GenerationRequest("Hi", task, PARAMS)])
        assert engine.resident.stats().bytes <= 2 * one
    stats = engine.resident.stats()
    assert (stats.hits, stats.misses) == (1, 6)  # t0 again right after t1 was the only hit
    assert [loads[t].calls for t in sorted(loads)] == [2, 1, 1, 1, 1]  # a read per miss, no more


def test_a_version_that_cannot_be_read_makes_its_task_unservable_not_the_engine(backbone, adapters):
    def damaged():
        raise AdapterError("content hash 0123… does not match the store's record")

    engine = DecoderEngine(backbone, config=EngineConfig(max_batch_size=8))
    engine.registry.register_stored("bad", by_reference(adapters["t0"], damaged))
    engine.registry.register_stored("good", by_reference(adapters["t1"]))
    with pytest.raises(UnservableTaskError) as caught:
        engine.submit(GenerationRequest("Hi", "bad", PARAMS))
    assert caught.value.task_id == "bad" and "v1 cannot be read from the store" in caught.value.reason
    assert "does not match the store's record" in caught.value.reason
    assert engine.generate([GenerationRequest("Hi", "good", PARAMS)])[0].finish_reason == "length"


def test_re_registering_drops_the_old_versions_factors(backbone, adapters):
    engine = DecoderEngine(backbone, config=EngineConfig(max_batch_size=8))
    old = engine.registry.register_stored("t", by_reference(adapters["t0"]))
    engine.generate([GenerationRequest("Hi", "t", PARAMS)])
    assert engine.resident.stats().entries == 1
    engine.registry.register_stored("t", by_reference(adapters["t1"]))
    engine.discard(old.cache_key)  # what the store sync does on a new version
    assert engine.resident.stats().entries == 0
