"""What the prompt-KV caches (hf/prompt_kv.py, llamacpp/prompt_kv.py) report beyond a PinnedLRU's
stats: hits and misses by task, and the bytes pooling saves inside the cache.

An entry holds a task version's pooled prompt (m = ⌈l/p⌉ positions); unpooled it would hold l, so
each entry saves (l - m) positions' keys and values, and a budget of B bytes keeps p times more
tasks hot. Both caches key their entries by the adapter entry's cache key, (task id, version).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import asdict, dataclass, field
from typing import Protocol

from .cache import CacheStats, PinnedLRU


class PromptKVValue(Protocol):
    """What a prompt-KV entry tells of itself."""

    @property
    def tokens(self) -> int: ...  # positions held: the pooled prompt's length

    @property
    def unpooled_tokens(self) -> int: ...  # the prompt's length before pooling (l)

    @property
    def nbytes(self) -> int: ...


@dataclass(frozen=True)
class TaskHits:
    hits: int = 0
    misses: int = 0


@dataclass
class PromptKVStats(CacheStats):
    """A prompt-KV cache's CacheStats (entries: the task versions resident), plus `unpooled_bytes`
    (what those entries would hold at their unpooled lengths) and the lookups by task id."""

    unpooled_bytes: int = 0
    by_task: dict[str, TaskHits] = field(default_factory=dict)

    @property
    def pooling_saved_bytes(self) -> int:
        return self.unpooled_bytes - self.bytes


class PromptKVLRU(PinnedLRU):
    """A PinnedLRU of PromptKVValues keyed by (task id, version), counting lookups by task id."""

    def __init__(self, max_bytes: int):
        super().__init__(max_bytes)
        self._by_task: dict[str, list[int]] = {}  # task id -> [hits, misses]; tasks that were served

    def _looked_up(self, key: Hashable, hit: bool) -> None:
        counts = self._by_task.setdefault(key[0], [0, 0])
        counts[0 if hit else 1] += 1

    def stats(self) -> PromptKVStats:
        with self._lock:
            unpooled = sum(e.nbytes // max(e.value.tokens, 1) * e.value.unpooled_tokens
                           for e in self._entries.values())
            return PromptKVStats(**asdict(self._stats_locked()), unpooled_bytes=unpooled,
                                 by_task={task: TaskHits(*c) for task, c in self._by_task.items()})
