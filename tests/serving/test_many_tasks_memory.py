"""10,000 tasks in one replica: a store (SQLite registry) holding 10,000 LAMP adapters of the size
issue 17 names (l=100, r=8, p=2 on the embedded backbone's d=576: 22 KB of factors each), synced
into an engine the way a replica does (`StoreSync`), then requests for a random sample of tasks.

The replica keeps a reference per task, not its factors: the factors of the tasks being served sit
in the engine's resident cache, within its byte budget, and the process grows by far less than the
factors of every task would take (220 MB here; 2.2 GB at 100,000, see `lamp bench registry`).
"""

from __future__ import annotations

import random
import time
from functools import partial

import psutil
import pytest
import torch

from lamp_runtime.adapters import AdapterLimits, AdapterMeta, LampAdapter, save_adapter
from lamp_runtime.adapters.stored import StoredAdapterRef
from lamp_runtime.engine.base import EngineConfig
from lamp_runtime.hf.decoder import DecoderEngine
from lamp_runtime.requests import GenerationRequest, SamplingParams
from serving.store.registry import open_store
from serving.store.base import NewAdapter
from serving.store.files import facts_of
from serving.store.sync import StoreSync

pytestmark = pytest.mark.slow

TASKS = 10_000
BATCH = 1_000
SERVED = 40
LIMITS = AdapterLimits()


def lamp_adapter(index: int, hidden: int) -> LampAdapter:
    g = torch.Generator().manual_seed(index)
    return LampAdapter(AdapterMeta(pool=2), torch.randn(100, 8, generator=g) * 0.3, torch.rand(8, generator=g),
                       torch.randn(8, hidden, generator=g) * 0.05)


def task_id(index: int) -> str:
    return f"task-{index:05d}"


def fill(store, hidden: int) -> None:
    for start in range(0, TASKS, BATCH):
        adapters = [(task_id(i), lamp_adapter(i, hidden)) for i in range(start, start + BATCH)]
        outcomes = store.put_many([NewAdapter(task, partial(save_adapter, adapter), facts_of(adapter, hidden))
                                   for task, adapter in adapters])
        assert not [o for o in outcomes if isinstance(o, Exception)]


def rss() -> int:
    return psutil.Process().memory_info().rss


def test_ten_thousand_tasks_are_served_from_bounded_memory(tmp_path, backbone):
    hidden = backbone.hidden_size
    store = open_store(tmp_path / "store")
    began = time.perf_counter()
    fill(store, hidden)
    filled = time.perf_counter()
    one = lamp_adapter(0, hidden).host_bytes
    budget = 8 * one
    engine = DecoderEngine(backbone, config=EngineConfig(max_batch_size=8, adapter_cache_bytes=budget,
                                                         prompt_cache_bytes=8 * 50 * hidden * 4))
    sync = StoreSync(store, engine.registry, engine, hidden, LIMITS, backbone.options)
    engine.generate([GenerationRequest(f"Warm up {i}", None, SamplingParams(max_new_tokens=2)) for i in range(8)])

    before = rss()
    assert len(sync.refresh().loaded) == TASKS
    synced, synced_at = rss(), time.perf_counter()
    sample = random.Random(0).sample(range(TASKS), SERVED)
    requests = [GenerationRequest("Tell me about", task_id(i), SamplingParams(max_new_tokens=2)) for i in sample]
    results = [r for start in range(0, SERVED, 8) for r in engine.generate(requests[start:start + 8])]
    served = rss()

    assert len(engine.registry) == TASKS
    assert all(isinstance(e.adapter, StoredAdapterRef) for e in engine.registry.entries())
    resident = engine.resident.stats()
    assert resident.misses == SERVED and resident.bytes <= budget and resident.entries <= 8
    assert engine.cache.stats().bytes <= engine.cache.max_bytes
    every_factor = TASKS * one
    print(f"\n{TASKS} tasks: written in {filled - began:.0f} s, synced in {synced_at - filled:.0f} s; factors "
          f"{every_factor / 2**20:.0f} MiB if all held; RSS {(synced - before) / 2**20:+.0f} MiB after the sync, "
          f"{(served - before) / 2**20:+.0f} MiB after serving {SERVED} tasks")
    assert served - before < every_factor / 2

    # What ran is each task's own adapter: equal to the factors registered directly.
    direct = DecoderEngine(backbone, config=EngineConfig(max_batch_size=8))
    for i in sample[:4]:
        direct.registry.register(task_id(i), lamp_adapter(i, hidden), version=1)
    assert [r.text for r in direct.generate(requests[:4])] == [r.text for r in results[:4]]
