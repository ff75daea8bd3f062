"""The adapter store's contract and its records, shaped on the registry (registry/: metadata in SQL,
the one store the server opens). The index.json of stores written before the registry is only read,
to import it once (index_json.py).

Files (the same on a local disk and on an object store): `<task>/v<N>.safetensors`, one file per
adapter version, written once and never modified, with its sha256 recorded. The current version of
each task is a registry row. A version becomes current only once its file is stored and verified, so
a failed or bad upload, or a crash at any point, leaves the previous version serving.
"""

from __future__ import annotations

import abc
import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from lamp_runtime.adapters.registry import validate_task_id
from lamp_runtime.errors import AdapterError

INDEX_NAME = "index.json"
LOCK_NAME = ".lock"
REGISTRY_NAME = "registry.sqlite3"  # the embedded registry database of a local store (registry/)
# Names of the store's own files, which a task's folder must never take.
RESERVED_NAMES = frozenset({INDEX_NAME, LOCK_NAME, REGISTRY_NAME, *(f"{REGISTRY_NAME}-{s}" for s in ("wal", "shm",
                                                                                                   "journal"))})
# Versions kept per task: the current one and the one before it, so a replica that read the
# previous version a moment ago can still open its file.
KEEP_VERSIONS = 2


REQUIRED_RECORD_FIELDS = ("task_id", "version", "kind", "prompt_tokens", "pooled_tokens", "bytes", "sha256",
                          "created_at", "source")


class StoreError(RuntimeError):
    """The store cannot be read or written (registry unreachable, disk full, lock timeout, a damaged
    index.json to import)."""


@dataclass(frozen=True)
class AdapterFacts:
    """What the validated adapter looks like; recorded in the registry next to its file. With
    `hidden_size`, `host_bytes` and `metadata` recorded too, a replica registers the version from
    its row alone and reads the file on the task's first request (serving/store/sync.py)."""

    kind: str
    prompt_tokens: int
    pooled_tokens: int
    pool: int = 1
    hidden_size: int | None = None  # d of the backbone it was validated for
    host_bytes: int | None = None  # of its factors once loaded
    metadata: str | None = None  # its safetensors header metadata, as JSON


@dataclass(frozen=True)
class StoredAdapter:
    task_id: str
    version: int
    kind: str
    prompt_tokens: int
    pooled_tokens: int
    bytes: int
    sha256: str
    created_at: float
    source: str  # "upload" or "bundled:<file name>"
    # None in rows and indexes written before each was recorded:
    pool: int | None = None  # the pooling block p
    hidden_size: int | None = None
    host_bytes: int | None = None
    metadata: str | None = None
    # The task's limits (registry stores; None: the defaults), not the version's: see set_limits.
    weight: float | None = None
    max_waiting: int | None = None

    @classmethod
    def written(cls, task_id: str, version: int, facts: AdapterFacts, size: int, sha256: str,
                source: str) -> "StoredAdapter":
        """The record of a version file just written and verified."""
        return cls(task_id, version, facts.kind, facts.prompt_tokens, facts.pooled_tokens, size, sha256, time.time(),
                   source, facts.pool, facts.hidden_size, facts.host_bytes, facts.metadata)

    @property
    def relative_path(self) -> str:
        return f"{self.task_id}/v{self.version}.safetensors"

    @property
    def registers_from_row(self) -> bool:
        """Whether the record says all a replica needs to register it without reading its file."""
        return None not in (self.pool, self.hidden_size, self.host_bytes, self.metadata)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "StoredAdapter":
        return cls(**{k: data[k] if k in REQUIRED_RECORD_FIELDS else data.get(k) for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class NewAdapter:
    """One adapter of `AdapterStore.put_many`: what `put` takes."""

    task_id: str
    write_file: Callable[[Path], None]
    facts: AdapterFacts
    verify: Callable[[Path], None] | None = None
    source: str = "upload"


@dataclass(frozen=True)
class ChangeSet:
    """What changed in the store after a replica's cursor (`AdapterStore.changes_since`)."""

    cursor: object  # pass it back to get only the later changes
    current: list[StoredAdapter]  # tasks whose current version is new to the caller
    removed: list[str]  # tasks deleted since the cursor
    complete: bool  # `current` lists every task: anything else the caller holds is gone


@dataclass(frozen=True)
class AdapterPage:
    """One page of the task list, in task-id order, and how many tasks there are in all."""

    adapters: list[StoredAdapter]
    total: int
    has_more: bool

    @property
    def last_id(self) -> str | None:
        return self.adapters[-1].task_id if self.adapters else None


class AdapterStore(abc.ABC):
    """What the admin API, the replicas' sync and the bundled import need of a store: the shape of
    the registry (registry/store.py), read by task, by page and by change."""

    @abc.abstractmethod
    def change_key(self):
        """A cheap fingerprint of the store's state that changes with every write (None: never written)."""

    @abc.abstractmethod
    def list(self) -> list[StoredAdapter]:
        """Every task's current version, in task-id order."""

    @abc.abstractmethod
    def get(self, task_id: str) -> StoredAdapter | None:
        """The task's current version (None: not stored)."""

    @abc.abstractmethod
    def page(self, limit: int, after: str | None = None) -> AdapterPage:
        """Up to `limit` tasks whose id sorts after `after`."""

    @abc.abstractmethod
    def changes_since(self, cursor) -> ChangeSet:
        """The changes after `cursor` (None: everything)."""

    @abc.abstractmethod
    def bundled_sha(self, task_id: str) -> str | None:
        """The sha256 of the bundled file last imported as `task_id` (None: never imported)."""

    @abc.abstractmethod
    def path_of(self, stored: StoredAdapter) -> Path:
        """A local file holding that version's bytes (an object store downloads it once)."""

    @abc.abstractmethod
    def put(self, task_id: str, write_file: Callable[[Path], None], facts: AdapterFacts, source: str = "upload",
            verify: Callable[[Path], None] | None = None, bundled_sha: str | None = None) -> StoredAdapter | None:
        """Store a new version of `task_id` and make it current.

        `write_file(path)` writes the adapter file; `verify(path)` (optional) re-reads it and raises
        if it is not what was meant, in which case nothing changes. With `bundled_sha`, the write is
        skipped (None returned) when that bundled source was already imported for this task.
        """

    def put_many(self, items: list[NewAdapter]) -> list[StoredAdapter | Exception]:
        """`put` for each (a registry store does it with one commit); each adapter is stored whole or
        not at all, and its result is its `StoredAdapter` or the exception it raised."""
        results: list[StoredAdapter | Exception] = []
        for item in items:
            try:
                results.append(self.put(item.task_id, item.write_file, item.facts, item.source, item.verify))
            except Exception as exc:  # reported per adapter by the caller
                results.append(exc)
        return results

    @abc.abstractmethod
    def delete(self, task_id: str) -> StoredAdapter | None:
        """Remove `task_id`; its version counter is kept, its limits cleared. None if it was not stored."""

    def set_limits(self, task_id: str, weight: float | None, max_waiting: int | None) -> StoredAdapter | None:
        """Record a stored task's fair-queue limits (None: the default) as a change every replica
        applies; they stay across its new versions. None if the task is not stored."""
        raise StoreError(f"{self!r} keeps no per-task limits: they need the registry (--registry, or a local "
                         f"store folder)")

    @staticmethod
    def sha256_of(path: Path) -> str:
        """The content hash the registry records for a version file."""
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    @staticmethod
    def check_task_id(task_id: str) -> None:
        """A valid task id that is not also the name of one of the store's own files: a task's folder
        named `index.json` would hide a store's index from its import, one named after the registry's
        SQLite files would collide with them."""
        validate_task_id(task_id)
        if task_id in RESERVED_NAMES:
            raise AdapterError(f"task id {task_id!r} is reserved by the adapter store; choose another name")
