"""The registry store: version files in a folder or object store, metadata in the registry database.

`put` in three steps, each safe to die after:
1. take the next version number, after the registry's counter and after any file of the task (a
   crashed writer's orphan keeps its number); write the file to a temporary name, verify it and
   rename it into place (object stores: one conditional PUT, which fails if another node took the
   number first: then the next one); nothing names the file yet;
2. one transaction makes the row current and hands out the next change number;
3. prune files older than the previous version (a replica may still be opening it).
A crash before 2 leaves the previous version current and at most an orphan file; after 2 the new
version is current and complete. The SQL is O(1): single rows by primary key.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from ..base import (
    KEEP_VERSIONS,
    AdapterFacts,
    AdapterPage,
    AdapterStore,
    ChangeSet,
    NewAdapter,
    StoredAdapter,
    StoreError,
)
from .database import RegistryDatabase
from .versions import NewVersion, VersionFiles, VersionTaken

log = logging.getLogger(__name__)

VERSION_ATTEMPTS = 20


class RegistryAdapterStore(AdapterStore):
    def __init__(self, files: VersionFiles, database: RegistryDatabase):
        self.files = files
        self.db = database
        self._import_index()

    def __repr__(self) -> str:
        return f"RegistryAdapterStore({self.files.location!r}, {self.db.name!r})"

    # ---- reading ---------------------------------------------------------------------------------

    def change_key(self) -> int:
        """The last change number: one single-row read."""
        return self.db.current_seq()

    def list(self) -> list[StoredAdapter]:
        return self.changes_since(None).current

    def get(self, task_id: str) -> StoredAdapter | None:
        return self.db.get(task_id)

    def page(self, limit: int, after: str | None = None) -> AdapterPage:
        return self.db.page(limit, after)

    def changes_since(self, cursor) -> ChangeSet:
        changes = self.db.changes_since(cursor)
        return ChangeSet(changes.cursor, sorted(changes.current, key=lambda a: a.task_id), changes.removed,
                         changes.complete)

    def path_of(self, stored: StoredAdapter) -> Path:
        return self.files.path_of(stored)

    def bundled_sha(self, task_id: str) -> str | None:
        return self.db.bundled_sha(task_id)

    # ---- writing ---------------------------------------------------------------------------------

    def put(self, task_id: str, write_file: Callable[[Path], None], facts: AdapterFacts, source: str = "upload",
            verify: Callable[[Path], None] | None = None, bundled_sha: str | None = None) -> StoredAdapter | None:
        self.check_task_id(task_id)
        with self.files.writers_lock():
            if bundled_sha is not None and self.db.bundled_sha(task_id) == bundled_sha:
                return None
            version = self._next_version(task_id)
            for _ in range(VERSION_ATTEMPTS):
                try:
                    size, sha = self.files.write(task_id, version, write_file, verify)
                    break
                except VersionTaken:  # another node's writer stored this number first
                    version += 1
            else:
                raise StoreError(f"adapter store {self.files.location}: no free version number for {task_id}")
            stored = StoredAdapter.written(task_id, version, facts, size, sha, source)
            made_current = self.db.make_current(stored, bundled_sha)
            self._after_commit(stored, made_current)
        if bundled_sha is not None and not made_current:
            return None
        log.info("stored adapter %s v%d (%s, %d bytes)", task_id, version, facts.kind, size)
        return stored

    def put_many(self, items: list[NewAdapter]) -> list[StoredAdapter | Exception]:
        """Many uploads: every file written and verified (two file-system syncs in all on a local
        folder), then one transaction makes each one that was stored current. Each adapter is
        stored whole or not at all; its result is its `StoredAdapter` or the exception it raised."""
        results: list[StoredAdapter | Exception | None] = [None] * len(items)
        with self.files.writers_lock():
            pending: list[tuple[int, NewVersion, NewAdapter]] = []
            seen = self.db.last_versions_of([item.task_id for item in items])
            for i, item in enumerate(items):
                try:
                    self.check_task_id(item.task_id)
                except Exception as exc:  # reported per adapter
                    results[i] = exc
                    continue
                version = max(seen.get(item.task_id, 0), self.files.max_version(item.task_id)) + 1
                seen[item.task_id] = version
                pending.append((i, NewVersion(item.task_id, version, item.write_file, item.verify), item))
            written = self.files.write_many([new for _, new, _ in pending])
            stored_ok: list[tuple[int, StoredAdapter]] = []
            for (i, new, item), outcome in zip(pending, written):
                if isinstance(outcome, Exception):
                    results[i] = outcome
                    continue
                size, sha = outcome
                stored_ok.append((i, StoredAdapter.written(new.task_id, new.version, item.facts, size, sha,
                                                           item.source)))
            made = self.db.make_current_many([s for _, s in stored_ok])
            for (i, stored), made_current in zip(stored_ok, made):
                self._after_commit(stored, made_current)
                results[i] = stored
        log.info("stored %d of %d adapters in one batch", len(stored_ok), len(items))
        return results

    def _next_version(self, task_id: str) -> int:
        """After the registry's counter and any file a crashed writer left (its number stays taken)."""
        return max(self.db.last_version(task_id), self.files.max_version(task_id)) + 1

    def _after_commit(self, stored: StoredAdapter, made_current: bool) -> None:
        if made_current:
            self.files.prune(stored.task_id, keep_from=stored.version - KEEP_VERSIONS + 1)
        else:
            log.info("adapter %s v%d was not made current (a later version or the same bundled file is)",
                     stored.task_id, stored.version)

    def delete(self, task_id: str) -> StoredAdapter | None:
        self.check_task_id(task_id)
        with self.files.writers_lock():
            stored = self.db.delete(task_id)
            if stored is None:
                return None
            self.files.remove_task(task_id)
        log.info("deleted adapter %s (was v%d)", task_id, stored.version)
        return stored

    def set_limits(self, task_id: str, weight: float | None, max_waiting: int | None) -> StoredAdapter | None:
        self.check_task_id(task_id)
        stored = self.db.set_limits(task_id, weight, max_waiting)
        if stored is not None:
            log.info("task %s limits: weight %s, max_waiting %s", task_id, weight, max_waiting)
        return stored

    # ---- migration -------------------------------------------------------------------------------

    def _import_index(self) -> None:
        """A store written before the registry (an index.json) is imported once, on first start:
        versions, hashes, the version counters and the bundled-import record. index.json is only
        ever read, here: never written, and not read again once imported."""
        if self.db.imported_index() is not None or self.db.has_rows():
            return
        index = self.files.read_index()
        if index is None:
            return
        label = f"{self.files.location}/index.json generation {index.generation}"
        reserved = self.files.versions_on_disk()
        if self.db.import_index(index, reserved, label):
            counters = set(index.last_versions) | set(reserved) | set(index.bundled)
            log.info("imported %s into the adapter registry %s: %d current tasks, %d version counters "
                     "(%d of deleted tasks), %d bundled-file records; index.json is kept as it was and no "
                     "longer read", label, self.db.name, len(index.tasks), len(counters | set(index.tasks)),
                     len(counters - set(index.tasks)), len(index.bundled))
