"""Host copies of stored adapters' factors for the tasks being served, bounded by bytes.

A serving replica's registry holds a `StoredEntry` per task (a `StoredAdapterRef`,
adapters/stored.py), not the factors. A request resolves its task's entry here: the factors are read
from the store on a miss (the file read, its hash checked) and kept, least recently used evicted
first. So the memory a replica spends on adapters is this budget plus its prompt caches', whatever
the number of registered tasks. The request keeps the loaded adapter it resolved (in its
`AdapterEntry`), so an eviction never affects a request in flight.
"""

from __future__ import annotations

from functools import singledispatchmethod

from ..adapters.registry import AdapterEntry, StoredEntry
from ..errors import AdapterError, UnservableTaskError
from ..prompts.cache import CacheStats, PinnedLRU


class ResidentAdapters:
    def __init__(self, max_bytes: int):
        self._loaded = PinnedLRU(max_bytes, size_of=lambda adapter: adapter.host_bytes)

    @singledispatchmethod
    def resolve(self, entry: AdapterEntry) -> AdapterEntry:
        """`entry` with its adapter's factors in memory: an `AdapterEntry` already has them."""
        return entry

    @resolve.register
    def _(self, entry: StoredEntry) -> AdapterEntry:
        """A `StoredEntry`'s factors, read from the store on a miss. A stored file that cannot be read
        back (deleted, damaged since it was registered) makes the task unservable, with the reason,
        rather than failing the engine step that needed it."""
        try:
            adapter = self._loaded.acquire(entry.cache_key, entry.adapter.load)
        except (AdapterError, OSError) as exc:
            raise UnservableTaskError(entry.task_id, f"v{entry.version} cannot be read from the store: {exc}") from None
        self._loaded.release(entry.cache_key)
        return AdapterEntry(entry.task_id, entry.version, adapter)

    def discard(self, cache_key) -> None:
        self._loaded.discard(cache_key)

    def stats(self) -> CacheStats:
        return self._loaded.stats()
