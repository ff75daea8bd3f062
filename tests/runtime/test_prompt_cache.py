import pytest
import torch

from lamp_runtime.prompts.cache import PromptCache
from lamp_runtime.prompts.prepared import PreparedPrompt


def tensor_of(nbytes: int) -> PreparedPrompt:
    return PreparedPrompt(torch.zeros(nbytes // 4, dtype=torch.float32))


def test_hit_miss_and_byte_accounting():
    cache = PromptCache(max_bytes=1000)
    builds = []
    t = cache.acquire(("a", 1), lambda: builds.append(1) or tensor_of(400))
    assert cache.acquire(("a", 1), lambda: builds.append(1) or tensor_of(400)) is t
    assert builds == [1]
    s = cache.stats()
    assert (s.hits, s.misses, s.bytes, s.entries, s.pinned) == (1, 1, 400, 1, 1)


def test_lru_eviction_by_bytes_skips_pinned_entries():
    cache = PromptCache(max_bytes=1000)
    for name in "abc":
        cache.acquire((name, 1), lambda: tensor_of(400))
    # all three pinned: over budget, but nothing pinned may go
    assert cache.stats().bytes == 1200 and cache.stats().evictions == 0
    cache.release(("b", 1))  # b is now the only evictable entry
    assert ("b", 1) not in cache and ("a", 1) in cache
    cache.release(("a", 1))
    cache.release(("c", 1))
    assert cache.stats().bytes == 800
    cache.acquire(("d", 1), lambda: tensor_of(400))  # evicts the least recently used: a
    assert ("a", 1) not in cache and ("c", 1) in cache and ("d", 1) in cache
    assert cache.stats().evictions == 2


def test_entry_larger_than_budget_is_served_then_dropped():
    cache = PromptCache(max_bytes=100)
    t = cache.acquire(("big", 1), lambda: tensor_of(400))
    assert t.prompt.numel() == 100 and ("big", 1) in cache
    cache.release(("big", 1))
    assert ("big", 1) not in cache and cache.stats().bytes == 0


def test_versions_are_separate_entries_and_release_must_match():
    cache = PromptCache(max_bytes=10_000)
    v1 = cache.acquire(("t", 1), lambda: PreparedPrompt(torch.ones(2)))
    v2 = cache.acquire(("t", 2), lambda: PreparedPrompt(torch.zeros(2)))
    assert not torch.equal(v1.prompt, v2.prompt)
    cache.release(("t", 1))
    with pytest.raises(KeyError):
        cache.release(("t", 1))


def test_cached_tensors_use_cache_dtype_and_count_the_offset():
    cache = PromptCache(max_bytes=10_000, dtype=torch.bfloat16)
    value = cache.acquire(("t", 1), lambda: PreparedPrompt(torch.ones(3, 2), torch.ones(4, 2)))
    assert value.prompt.dtype == value.offset.dtype == torch.bfloat16
    assert cache.stats().bytes == (6 + 8) * 2


def test_acquire_cached_pins_a_hit_and_counts_nothing_on_a_miss():
    from lamp_runtime.prompts.cache import PinnedLRU

    cache = PinnedLRU(100, size_of=len)
    assert cache.acquire_cached("a") is None
    assert (cache.stats().hits, cache.stats().misses) == (0, 0)
    cache.acquire("a", lambda: b"x" * 60)  # built by the caller outside the lock, stored with the miss counted
    cache.release("a")
    assert cache.acquire_cached("a") == b"x" * 60
    cache.acquire("b", lambda: b"y" * 60)  # over the budget: "a" is pinned, so it stays
    assert "a" in cache and (cache.stats().hits, cache.stats().misses) == (1, 2)
    cache.release("b")
    cache.release("a")
    cache.acquire("c", lambda: b"z" * 60)
    assert "a" not in cache and "b" not in cache
