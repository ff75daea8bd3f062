"""The registry store: version files in a folder or object store, metadata in the registry database.

`put` in four steps, each safe to die after:
1. reserve the next version number (committed: no other writer, and no writer after a crash, reuses it);
2. write the file to a temporary name, verify it, and rename it into place (object stores: one
   conditional PUT); nothing names it yet;
3. one transaction makes the row current and hands out the next change number;
4. prune files older than the previous version (a replica may still be opening it).
A crash before 3 leaves the previous version current and at most an orphan file; after 3 the new
version is current and complete. Every step but 2 is O(1) SQL on primary keys.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from ..base import KEEP_VERSIONS, AdapterFacts, AdapterPage, AdapterStore, ChangeSet, StoredAdapter, StoreError
from .database import RegistryDatabase
from .versions import VersionFiles, VersionTaken

log = logging.getLogger(__name__)

RESERVE_ATTEMPTS = 20


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

    def read_index(self):
        raise StoreError("a registry store has no index file; use list(), page() or changes_since()")

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
            version = self.db.reserve_version(task_id)
            for _ in range(RESERVE_ATTEMPTS):
                try:
                    size, sha = self.files.write(task_id, version, write_file, verify)
                    break
                except VersionTaken:  # an orphan of a writer that died before step 1 existed
                    version = self.db.reserve_version(task_id, at_least=version)
            else:
                raise StoreError(f"adapter store {self.files.location}: no free version number for {task_id}")
            stored = StoredAdapter(task_id, version, facts.kind, facts.prompt_tokens, facts.pooled_tokens, size, sha,
                                   time.time(), source, facts.pool)
            if not self.db.make_current(stored, bundled_sha):
                if bundled_sha is not None:
                    self.files.prune(task_id, keep_from=self._keep_from(task_id))
                    return None
                log.info("adapter %s v%d was superseded by a later upload before it became current",
                         task_id, version)
                return stored
            self.files.prune(task_id, keep_from=version - KEEP_VERSIONS + 1)
        log.info("stored adapter %s v%d (%s, %d bytes)", task_id, version, facts.kind, size)
        return stored

    def delete(self, task_id: str) -> StoredAdapter | None:
        self.check_task_id(task_id)
        with self.files.writers_lock():
            stored = self.db.delete(task_id)
            if stored is None:
                return None
            self.files.remove_task(task_id)
        log.info("deleted adapter %s (was v%d)", task_id, stored.version)
        return stored

    def _keep_from(self, task_id: str) -> int:
        current = self.db.get(task_id)
        return current.version - KEEP_VERSIONS + 1 if current else 1

    # ---- migration -------------------------------------------------------------------------------

    def _import_index(self) -> None:
        """A store written before the registry (an index.json) is imported once, on first start:
        versions, hashes, the version counters and the bundled-import record."""
        legacy = self.files.index_store
        key = legacy.change_key()
        if key is None:
            return
        index = legacy.read_index()
        label = f"{self.files.location}/index.json generation {index.generation}"
        if self.db.import_index(index, self.files.versions_on_disk(), label):
            log.info("imported %s into the adapter registry %s: %d tasks (index.json is kept, no longer read)",
                     label, self.db.name, len(index.tasks))
