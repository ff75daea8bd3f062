"""Keep one replica's in-memory registry equal to the persistent store.

Each model replica calls `refresh_if_changed()` on every request (one single-row read of the
registry's change number when nothing changed) and every ~200 ms
in the background. So once an admin call has returned, any request on any replica already sees the
new state, and idle replicas also drop deleted adapters from memory promptly. A registry store
hands over only the rows changed after the last change number the replica applied. A version is
registered by reference (`StoredAdapterRef`, not its factors). At a replica's start it comes from
its row alone: kind, lengths, pool, hidden size (checked against this backbone), factor bytes and
header metadata are recorded when it is written, so a replica starting on 100,000 tasks opens no
adapter file. A change applied later has its file read and checked here (one file per change), so
a damaged file leaves the previous version serving. The engine reads a task's file (hash and shapes
checked) into its bounded resident cache when a request first needs it, so a replica's memory does
not grow with the factors of every task. Rows written before those facts were recorded (registry
schema 1, rows imported from an old index.json) have their file read once here. A task's limits set through the
admin API (weight, max_waiting) are a change too: the sync hands them to the engine's fair queue. Requests already running keep the `AdapterEntry` they resolved, so they finish
on the version they started with.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

from lamp_runtime.adapters import AdapterLimits, PromptAdapter
from lamp_runtime.adapters.provenance import serving_mismatch
from lamp_runtime.adapters.registry import AdapterRegistry
from lamp_runtime.adapters.stored import StoredAdapterRef
from lamp_runtime.engine.fair_queue import TaskLimits
from lamp_runtime.errors import AdapterError, UnknownTaskError

from .base import AdapterStore, StoreError
from .files import load_stored, stored_reference

log = logging.getLogger(__name__)

# Loading an adapter allocates temporaries (the file's bytes, the parsed tensors) between
# long-lived small tensors, and glibc keeps the freed heap: a replica syncing tens of thousands of
# adapters would hold many times what it keeps (`lamp bench registry` reports the server's
# RSS: docs/serving.md, docs/bench/registry.json). So the heap is trimmed after every this many loads.
TRIM_AFTER_LOADS = 1024


def _return_free_heap() -> None:
    """Give freed heap back to the OS (glibc's malloc_trim; nothing elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class SyncReport:
    loaded: list[str] = field(default_factory=list)  # "task v3"
    removed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def _summary(names: list[str], shown: int = 20) -> str:
    """A log line's list: a replica starting on 100,000 tasks must not log them all."""
    if not names:
        return "-"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


class Discards(Protocol):
    def discard(self, cache_key) -> None: ...


class StoreSync:
    def __init__(self, store: AdapterStore, registry: AdapterRegistry, built: Discards,
                 hidden_size: int, limits: AdapterLimits, backbone_options=None,
                 apply_limits: Callable[[str, TaskLimits], bool] | None = None):
        """`built` forgets what was built for a replaced or deleted version: the engine (its
        prompt and prompt-KV caches) or a PromptCache alone. `apply_limits` (the engine's
        `set_task_limits`) gets each task's limits recorded through the admin API."""
        self.store = store
        self.registry = registry
        self.built = built
        self.hidden_size = hidden_size
        self.limits = limits
        self.backbone_options = backbone_options  # resolved; None: no numerics check
        self.apply_limits = apply_limits
        self._limited: set[str] = set()  # tasks given other limits than the defaults
        self._lock = threading.Lock()
        self._seen_key: object = ()  # () = never read
        self._cursor = None  # the last change applied (None: load everything)
        self._loads_since_trim = 0
        self._failed: set[tuple[str, int]] = set()  # versions that failed to load: not retried
        # Tasks in the store that this replica cannot serve at all (no earlier version loaded),
        # with the reason, so a request for one is told why instead of "unknown task".
        self.unservable: dict[str, str] = {}

    def changed(self) -> bool:
        return self.store.change_key() != self._seen_key

    def refresh_if_changed(self) -> SyncReport | None:
        if not self.changed():
            return None
        return self.refresh()

    def refresh(self) -> SyncReport:
        """Bring the registry up to date with the store; problems are logged, never raised.

        The store answers with the rows changed since the last change this replica applied (O(changes))."""
        report = SyncReport()
        with self._lock:
            key = self.store.change_key()
            if key == self._seen_key:
                return report
            try:
                changes = self.store.changes_since(self._cursor)
            except StoreError as exc:
                # Keep serving what we have; the next change (a new key) tries again.
                log.error("%s", exc)
                self._seen_key = key
                return report
            starting = self._cursor is None
            for stored in changes.current:
                self._load(stored, report, from_row=starting)
                self._set_limits(stored.task_id, stored.weight, stored.max_waiting)
            removed = set(changes.removed)
            if changes.complete:
                listed = {stored.task_id for stored in changes.current}
                removed |= {e.task_id for e in self.registry.entries() if e.task_id not in listed}
                removed |= {t for t in self.unservable if t not in listed}
            for task_id in sorted(removed):
                self._remove(task_id, report)
                self._set_limits(task_id, None, None)
                self.unservable.pop(task_id, None)
            self._cursor = changes.cursor
            self._seen_key = changes.cursor
        if report.loaded or report.removed or report.failed:
            log.info("adapter store sync: loaded %s, removed %s, failed %s",
                     _summary(report.loaded), _summary(report.removed), _summary(report.failed))
        return report

    def _load(self, stored, report: SyncReport, from_row: bool) -> None:
        try:
            current = self.registry.get(stored.task_id)
        except UnknownTaskError:
            current = None
        if current is not None and current.version == stored.version:
            return
        if (stored.task_id, stored.version) in self._failed:
            return
        try:
            ref = self._reference(stored, from_row)
            self.registry.register_stored(stored.task_id, ref, stored.version)
        except (AdapterError, OSError) as exc:
            self._failed.add((stored.task_id, stored.version))
            report.failed.append(f"{stored.task_id} v{stored.version}")
            if current is None:
                self.unservable[stored.task_id] = f"v{stored.version}: {exc}"
            log.error("cannot load adapter %s v%d from the store (%s): %s", stored.task_id, stored.version,
                      f"v{current.version} keeps serving" if current else "the task is not served", exc)
            return
        self.unservable.pop(stored.task_id, None)
        if self.backbone_options is not None and (warning := serving_mismatch(ref, self.backbone_options)):
            log.warning("adapter %s v%d: %s", stored.task_id, stored.version, warning)
        if current is not None:
            self.built.discard(current.cache_key)  # pinned by running requests? then LRU takes it later
        report.loaded.append(f"{stored.task_id} v{stored.version}")

    def _reference(self, stored, from_row: bool) -> StoredAdapterRef:
        """At a replica's start, from the version's record alone when it says enough (no file
        opened). A change a running replica applies has its file read and checked here, so a bad
        file never replaces the version it holds; so has a record written before those facts were
        recorded (heap trimmed every TRIM_AFTER_LOADS reads, also within one large sync)."""
        load = partial(self._read, stored)
        if from_row and stored.registers_from_row:
            return stored_reference(stored, self.hidden_size, self.limits, load)
        adapter = load()
        self._loads_since_trim += 1
        if self._loads_since_trim >= TRIM_AFTER_LOADS:
            self._loads_since_trim = 0
            _return_free_heap()
        return StoredAdapterRef.of(adapter, load)

    def _read(self, stored) -> PromptAdapter:
        """The version's adapter from its file, hash-checked and validated against this backbone."""
        return load_stored(self.store.path_of(stored), stored.sha256, self.hidden_size, self.limits)

    def _set_limits(self, task_id: str, weight: float | None, max_waiting: int | None) -> None:
        """Hand the engine a task's limits when they are not the defaults, or no longer are."""
        if self.apply_limits is None or (weight is None and max_waiting is None and task_id not in self._limited):
            return
        try:
            limits = TaskLimits(1.0 if weight is None else weight, max_waiting)
        except ValueError as exc:  # validated when written: only a hand-edited row gets here
            log.error("task %s: recorded limits ignored: %s", task_id, exc)
            return
        if not self.apply_limits(task_id, limits):
            log.warning("task %s: this engine has no fair queue; its limits (weight %s, max_waiting %s) are not "
                        "applied", task_id, limits.weight, limits.max_waiting)
        if limits == TaskLimits():
            self._limited.discard(task_id)
        else:
            self._limited.add(task_id)

    def _remove(self, task_id: str, report: SyncReport) -> None:
        try:
            entry = self.registry.remove(task_id)
        except UnknownTaskError:
            return
        self.built.discard(entry.cache_key)
        report.removed.append(task_id)
