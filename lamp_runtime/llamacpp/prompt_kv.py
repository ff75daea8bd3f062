"""Each (task, version)'s soft-prompt keys/values, computed once into a llama.cpp sequence of its own.

A request of that version starts from them by `llama_memory_seq_cp(prompt seq -> request seq)`:
in the unified KV cache a cell can belong to several sequences, so the copy shares the prompt's
cells instead of copying keys and values. Bounded by bytes (cells x bytes per cell) and by the
sequence ids set aside for prompts; least recently used first, pinned while a request is being
prefilled from it, dropped on re-registration (`discard`), with the prompt cache's stats shape.

An entry removed here (evicted or discarded, from any thread) is not freed at once: its sequence
id goes to `pending_free`, and the engine's loop thread removes its cells (`seq_rm`) at the start
of its next step, the only thread that calls into llama.cpp.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from ..prompts.prompt_kv import PromptKVLRU


@dataclass(frozen=True)
class PromptSeq:
    seq_id: int
    tokens: int
    nbytes: int
    unpooled_tokens: int  # the task's prompt length before pooling (l)


class PromptSeqCache(PromptKVLRU):
    def __init__(self, max_bytes: int, seq_ids: list[int]):
        super().__init__(max_bytes)
        self.max_entries = len(seq_ids)
        self.free_ids = list(seq_ids)  # the loop thread's: ids whose cells are gone
        self._pending_free: list[int] = []  # ids of removed entries whose cells are still to go

    def _remove_locked(self, key: Hashable) -> None:
        self._pending_free.append(self._entries[key].value.seq_id)
        super()._remove_locked(key)

    def take_pending(self) -> list[int]:
        """Sequence ids of removed entries, for the loop thread to seq_rm and then return to `free_ids`."""
        with self._lock:
            ids, self._pending_free = self._pending_free, []
            return ids

    def make_room(self, nbytes: int) -> bool:
        """Evict unpinned entries (oldest first) until `nbytes` more fit the budget and a sequence
        id can be had; False when the pinned ones leave no room (the caller then caches nothing)."""
        with self._lock:
            def fits():
                return self._stats.bytes + nbytes <= self.max_bytes and len(self._entries) < self.max_entries

            for key in [k for k, e in self._entries.items() if e.pins == 0]:
                if fits():
                    break
                self._remove_locked(key)
            return fits()

    def cells(self) -> int:
        with self._lock:
            return sum(e.value.tokens for e in self._entries.values())

    def get_seq_id(self, key: Hashable) -> int | None:
        """The sequence holding `key`'s prompt (None: not cached)."""
        with self._lock:
            entry = self._entries.get(key)
            return entry.value.seq_id if entry is not None else None
