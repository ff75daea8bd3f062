"""Memory with 10,000 registered adapters: the registry holds each adapter's small factors (linear
in the number of adapters, by design), while the built prompts live in the byte-bounded LRU cache,
and each task's prompt keys/values in the byte-bounded prompt-KV cache, so serving every one of the
10,000 tasks grows the process by at most the two budgets, not by 10,000 prompts. Measured as RSS
of this process (after returning freed heap to the OS), not as a timing."""

from __future__ import annotations

import ctypes
import gc

import psutil
import pytest
import torch

from lamp_runtime.adapters import AdapterMeta, LampAdapter
from lamp_runtime.engine.base import EngineConfig
from lamp_runtime.hf.decoder import DecoderEngine
from lamp_runtime.prompts.prepared import prepare
from lamp_runtime.requests import GenerationRequest, SamplingParams

from .conftest import measured

ADAPTERS = 10_000
PROMPT_TOKENS, RANK = 16, 4
CACHE_BYTES = 8 * 1024 * 1024
KV_CACHE_BYTES = 8 * 1024 * 1024  # the prompt-KV cache's budget (~11 tasks' 16-token prompts)
SLACK_BYTES = 48 * 1024 * 1024  # allocator and interpreter noise around the measured operations
GENERATED_TASKS = 48  # real generations through the engine, spread over all tasks
MiB = 1024 * 1024


def rss() -> int:
    gc.collect()
    try:  # give freed heap back to the OS, so RSS shows what is live
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return psutil.Process().memory_info().rss


def make_adapters(n: int, hidden: int) -> list[LampAdapter]:
    g = torch.Generator().manual_seed(0)
    return [LampAdapter(AdapterMeta(), torch.randn(PROMPT_TOKENS, RANK, generator=g) * 0.1,
                        torch.rand(RANK, generator=g) + 0.5, torch.randn(RANK, hidden, generator=g) * 0.02)
            for _ in range(n)]


@pytest.fixture()
def one_torch_thread():
    """10,000 tiny prompt builds: on 2 busy cores, torch's thread pool costs ~30x the work itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_ten_thousand_adapters_keep_memory_bounded(backbone, one_torch_thread):
    engine = DecoderEngine(backbone, config=EngineConfig(max_batch_size=16, max_new_tokens=1,
                                                  prompt_cache_bytes=CACHE_BYTES,
                                                  prompt_kv_cache_bytes=KV_CACHE_BYTES))
    params = SamplingParams(max_new_tokens=1)
    # A full batch first: the forward pass pages in the (memory-mapped) weights and sizes torch's
    # buffers, ~0.5 GiB of RSS that has nothing to do with adapters.
    engine.generate([GenerationRequest("Hello", None, params) for _ in range(16)])
    start = rss()
    adapters = make_adapters(ADAPTERS, backbone.hidden_size)
    for i, adapter in enumerate(adapters):
        engine.registry.register(f"task-{i}", adapter)
    registered = rss()
    host_bytes = adapters[0].host_bytes
    prompt_bytes = prepare(adapters[0]).nbytes
    del adapters

    # Every task's prompt goes through the cache exactly as a request's does (acquire on admission,
    # release when it finishes); a sample also generates for real, in mixed-task batches.
    sample = {f"task-{i}" for i in range(0, ADAPTERS, ADAPTERS // GENERATED_TASKS)}
    for i in range(ADAPTERS):
        entry = engine.registry.get(f"task-{i}")
        engine.cache.acquire(entry.cache_key, lambda: prepare(entry.adapter))
        engine.cache.release(entry.cache_key)
    results = engine.generate([GenerationRequest("Hello", task, params) for task in sorted(sample)])
    assert len(results) == len(sample) and all(r.completion_tokens == 1 for r in results)
    served = rss()

    stats = engine.cache.stats()
    unbounded = ADAPTERS * prompt_bytes
    assert unbounded > 3 * (CACHE_BYTES + SLACK_BYTES), "too few adapters for the check to mean anything"
    assert stats.bytes <= CACHE_BYTES and stats.entries <= CACHE_BYTES // prompt_bytes
    assert stats.evictions >= ADAPTERS - CACHE_BYTES // prompt_bytes
    kv = engine.prompt_kv.stats()
    assert kv.bytes <= KV_CACHE_BYTES and kv.misses == len(sample) and kv.evictions == len(sample) - kv.entries
    assert served - registered <= CACHE_BYTES + KV_CACHE_BYTES + SLACK_BYTES, \
        f"serving all tasks grew RSS by {(served - registered) / MiB:.0f} MiB"
    per_adapter = (registered - start) / ADAPTERS
    assert per_adapter <= 2 * host_bytes + 4096, f"{per_adapter:.0f} bytes per registered adapter"
    measured("memory", adapters=ADAPTERS, registry_growth_mib=round((registered - start) / MiB, 1),
             bytes_per_adapter=round(per_adapter), factor_bytes=host_bytes,
             serving_growth_mib=round((served - registered) / MiB, 1), cache_mib=round(stats.bytes / MiB, 1),
             cache_budget_mib=round(CACHE_BYTES / MiB), cache_entries=stats.entries, evictions=stats.evictions,
             unbounded_would_be_mib=round(unbounded / MiB))
