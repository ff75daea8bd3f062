"""Task id -> current adapter version, in host memory.

The registry maps each registered task to its current version, in one of two states, each its own
type: an `AdapterEntry` holds the adapter's factors on the host (`register`, as `lamp generate`, the
benches and the tests do); a `StoredEntry` holds a `StoredAdapterRef` (adapters/stored.py) whose
factors stay in the store until a request needs them (`register_stored`, as a serving replica does;
engine/resident.py keeps a bounded set loaded and turns a `StoredEntry` into an `AdapterEntry`).
Both answer what admission, chat rendering and results read (kind, lengths, meta through
`.adapter`). What a prompt is built into lives in the bounded `PromptCache`. A lookup returns an
immutable entry, so a request keeps the version it resolved even if the task is re-registered or
deleted while it runs.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

from ..errors import AdapterError, UnknownTaskError
from .base import PromptAdapter
from .stored import StoredAdapterRef

# Letters, digits, '.', '_' and '-', starting with a letter or digit: safe as a file name, a URL
# path segment and a metric label; rules out '..', slashes and unicode look-alikes.
TASK_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def is_valid_task_id(task_id) -> bool:
    return isinstance(task_id, str) and bool(TASK_ID_PATTERN.fullmatch(task_id)) and ".." not in task_id


def validate_task_id(task_id: str) -> str:
    if not is_valid_task_id(task_id):
        raise AdapterError(
            f"invalid task id {task_id!r}: use 1-64 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit, without '..'"
        )
    return task_id


@dataclass(frozen=True)
class _TaskVersion:
    task_id: str
    version: int

    @property
    def cache_key(self) -> tuple[str, int]:
        """What every cache of what is built from this version is keyed by."""
        return (self.task_id, self.version)


@dataclass(frozen=True)
class AdapterEntry(_TaskVersion):
    """A task version whose factors are in host memory: what an engine builds a prompt from."""

    adapter: PromptAdapter


@dataclass(frozen=True)
class StoredEntry(_TaskVersion):
    """A task version whose factors stay in the store (`adapter` is its reference);
    engine/resident.py loads them into an `AdapterEntry` when a request needs them."""

    adapter: StoredAdapterRef


RegisteredEntry = AdapterEntry | StoredEntry


class AdapterRegistry:
    """Thread-safe map of task id to its current `AdapterEntry`; versions only go up."""

    def __init__(self):
        self._lock = threading.Lock()
        self._entries: dict[str, RegisteredEntry] = {}
        self._last_version: dict[str, int] = {}

    def register(self, task_id: str, adapter: PromptAdapter, version: int | None = None) -> AdapterEntry:
        """Make `adapter` (its factors in memory) the current version of `task_id`. With `version` None
        the next one is used; an explicit version (e.g. from a persistent store) must not go backwards."""
        return self._put(task_id, version, lambda v: AdapterEntry(task_id, v, adapter))

    def register_stored(self, task_id: str, ref: StoredAdapterRef, version: int | None = None) -> StoredEntry:
        """Make the stored version `ref` points at the current version of `task_id` (its factors are
        loaded when a request needs them)."""
        return self._put(task_id, version, lambda v: StoredEntry(task_id, v, ref))

    def _put(self, task_id: str, version: int | None, make):
        validate_task_id(task_id)
        with self._lock:
            last = self._last_version.get(task_id, 0)
            if version is None:
                version = last + 1
            elif version < last:
                raise AdapterError(f"task {task_id!r}: version {version} is older than current {last}")
            entry = make(version)
            self._entries[task_id] = entry
            self._last_version[task_id] = version
            return entry

    def get(self, task_id: str) -> RegisteredEntry:
        with self._lock:
            entry = self._entries.get(task_id)
        if entry is None:
            raise UnknownTaskError(task_id)
        return entry

    def remove(self, task_id: str) -> RegisteredEntry:
        with self._lock:
            entry = self._entries.pop(task_id, None)
        if entry is None:
            raise UnknownTaskError(task_id)
        return entry

    def entries(self) -> list[RegisteredEntry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.task_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, task_id: str) -> bool:
        with self._lock:
            return task_id in self._entries
