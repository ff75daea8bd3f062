"""Device-side cache of reconstructed + pooled prompts, bounded by bytes, with pinning.

`PinnedLRU` is the mechanism (any value with `nbytes`; the decoder engine's prompt-KV cache uses it
too); `PromptCache` holds `PreparedPrompt`s (prompts/prepared.py), moved to the backbone's device. Key: (task id, adapter version), so a
re-registered task never serves a stale prompt. An entry acquired by an in-flight batch is
pinned (ref-counted) and is never evicted until released: the lesson of vLLM issue #14497. When
every entry is pinned the cache may sit above its byte budget until batches finish; it then
shrinks back on release.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from .prepared import PreparedPrompt


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes: int = 0
    entries: int = 0
    pinned: int = 0
    build_seconds_total: float = 0.0


class _Entry:
    __slots__ = ("value", "nbytes", "pins")

    def __init__(self, value, nbytes: int):
        self.value = value
        self.nbytes = nbytes
        self.pins = 0


class PinnedLRU:
    """Values by key, least recently used evicted first past `max_bytes`, except the pinned ones:
    `acquire` pins, `release` unpins. A value's size is `size_of(value)` (default: its `nbytes`)."""

    def __init__(self, max_bytes: int, size_of: Callable[[object], int] = lambda value: value.nbytes):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self._size_of = size_of
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._stats = CacheStats()

    def _materialize(self, value):
        """What is stored for a freshly built value (subclasses move it to their device)."""
        return value

    def acquire(self, key: Hashable, build: Callable[[], object]):
        """Return the cached value for `key`, building it on a miss, and pin it until `release`.

        Built under the lock: a prompt build is one small GEMM plus a copy, far cheaper than
        letting two requests for the same new task build it twice.
        """
        with self._lock:
            entry = self._entries.get(key)
            self._looked_up(key, entry is not None)
            if entry is None:
                self._stats.misses += 1
                started = time.perf_counter()
                value = self._materialize(build())
                self._stats.build_seconds_total += time.perf_counter() - started
                entry = _Entry(value, self._size_of(value))
                self._entries[key] = entry
                self._stats.bytes += entry.nbytes
            else:
                self._stats.hits += 1
                self._entries.move_to_end(key)
            entry.pins += 1
            self._evict_locked()
            return entry.value

    def acquire_cached(self, key: Hashable):
        """The value cached for `key`, pinned until `release` and counted as a hit; None on a miss,
        not counted: for a value too slow to build under the lock, which the caller builds and then
        stores with `acquire` (counting the miss)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._looked_up(key, True)
            self._stats.hits += 1
            self._entries.move_to_end(key)
            entry.pins += 1
            return entry.value

    def _looked_up(self, key: Hashable, hit: bool) -> None:
        """Called under the lock on every counted lookup (subclasses count by key)."""

    def release(self, key: Hashable) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.pins == 0:
                raise KeyError(f"release of {key!r} without a matching acquire")
            entry.pins -= 1
            self._evict_locked()

    def discard(self, key: Hashable) -> None:
        """Drop an entry now unless pinned (then it goes by LRU after release)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.pins == 0:
                self._remove_locked(key)

    def _remove_locked(self, key: Hashable) -> None:
        entry = self._entries.pop(key)
        self._stats.bytes -= entry.nbytes
        self._stats.evictions += 1

    def _evict_locked(self) -> None:
        if self._stats.bytes <= self.max_bytes:
            return
        for key in [k for k, e in self._entries.items() if e.pins == 0]:  # oldest first
            if self._stats.bytes <= self.max_bytes:
                break
            self._remove_locked(key)

    def stats(self) -> CacheStats:
        with self._lock:
            return self._stats_locked()

    def _stats_locked(self) -> CacheStats:
        s = self._stats
        return CacheStats(s.hits, s.misses, s.evictions, s.bytes, len(self._entries),
                          sum(1 for e in self._entries.values() if e.pins), s.build_seconds_total)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries


class PromptCache(PinnedLRU):
    """Built prompts (`PreparedPrompt`), on the backbone's device in its dtype."""

    def __init__(self, max_bytes: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(max_bytes)
        self.device = torch.device(device)
        self.dtype = dtype

    def _materialize(self, value: PreparedPrompt) -> PreparedPrompt:
        return value.to(self.device, self.dtype)
