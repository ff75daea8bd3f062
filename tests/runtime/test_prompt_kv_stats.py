"""What the prompt-KV caches report beyond their LRU: lookups by task and the bytes pooling saves
(prompts/prompt_kv.py, under both engines' caches)."""

from __future__ import annotations

from dataclasses import dataclass

from lamp_runtime.prompts.prompt_kv import PromptKVLRU, TaskHits

PER_POSITION = 1000


@dataclass(frozen=True)
class Entry:
    tokens: int
    unpooled_tokens: int

    @property
    def nbytes(self) -> int:
        return self.tokens * PER_POSITION


def test_lookups_are_counted_by_task_and_savings_follow_the_entries_held():
    cache = PromptKVLRU(max_bytes=25 * PER_POSITION)
    pooled, plain = Entry(10, 100), Entry(12, 12)  # l = 100 at p = 10; l = 12 unpooled
    for key, value in ((("a", 1), pooled), (("a", 1), pooled), (("b", 1), plain), (("a", 1), pooled)):
        cache.acquire(key, lambda value=value: value)
        cache.release(key)
    stats = cache.stats()
    assert stats.by_task == {"a": TaskHits(hits=2, misses=1), "b": TaskHits(hits=0, misses=1)}
    assert (stats.entries, stats.bytes, stats.unpooled_bytes) == (2, 22 * PER_POSITION, 112 * PER_POSITION)
    assert stats.pooling_saved_bytes == 90 * PER_POSITION

    cache.acquire(("a", 2), lambda: Entry(10, 100))  # a new version: past the budget, "b" goes (LRU)
    cache.release(("a", 2))
    stats = cache.stats()
    assert stats.by_task["a"] == TaskHits(hits=2, misses=2)
    assert (stats.entries, stats.pooling_saved_bytes) == (2, 180 * PER_POSITION)
    cache.discard(("a", 1))
    cache.discard(("a", 2))
    assert cache.stats().pooling_saved_bytes == 0  # what is not held saves nothing
