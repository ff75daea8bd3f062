"""The index.json store on an object store or any other fsspec URL (`s3://bucket/prefix`, `gs://...`),
as lamp-serve kept it before the registry: the registry (registry/) imports its index once and
stores its version objects with the helpers here; the server never opens it as its store.

Same layout and the same contract (base.AdapterStore) as the local store (local.py), so the rest
of serving never branches on the backend: `<prefix>/<task>/v<N>.safetensors` objects, written once and
never modified, and one small `<prefix>/index.json` naming the current version of each task.

Why this is consistent on S3 (whose PUTs are atomic per object, with strong read-after-write):
1. The version object is uploaded first, with `If-None-Match: *` so two writers can never share a
   version number (the loser takes the next one). Nothing names it yet, so a crash here only leaves
   an orphan whose number stays reserved (version numbers are taken from a listing of the task's
   prefix as well as from the index).
2. Then the index is replaced by one PUT with `If-Match: <etag read>`: a compare-and-swap. If any
   other writer replaced it since we read it, S3 answers 412 and we read it again and redo the
   change. Readers therefore see the index before or after a registration, never half of one, and
   never an index naming an object that is not there yet.
3. Replicas learn about changes with one HEAD of the index (its ETag) at most every
   `CHECK_INTERVAL_S`, and read the index only when the ETag changed; version objects are
   downloaded once (into a local cache, hash-checked against the index) when first needed.
Other fsspec backends have no conditional PUT: there the index write is a plain PUT, which is
atomic on object stores but not serialised between writers, so keep to one admin writer at a time
(a warning says so at start).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .base import (
    INDEX_NAME,
    KEEP_VERSIONS,
    AdapterFacts,
    AdapterStore,
    IndexFileStore,
    StoredAdapter,
    StoreError,
    StoreIndex,
)

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 0.2  # at most this many seconds between two HEADs of the index, per process
CAS_ATTEMPTS = 20
VERSION_OBJECT = re.compile(r"v(\d+)\.safetensors")
CONDITIONAL_PROTOCOLS = ("s3", "s3a")
CACHED_VERSIONS = 2  # local copies kept per task


class IndexConflict(Exception):
    """Another writer replaced the index between our read and our write."""


def staged_upload(write_file: Callable[[Path], None], verify: Callable[[Path], None] | None) -> tuple[bytes, str]:
    """An adapter file's bytes and sha256, written (and verified, if asked) in a local temporary
    folder first: an object store gets one whole object, and only one that passed the checks."""
    with tempfile.TemporaryDirectory(prefix="lamp-upload-") as tmp_dir:
        local = Path(tmp_dir) / "adapter.safetensors"
        write_file(local)
        if verify is not None:
            verify(local)
        return local.read_bytes(), AdapterStore.sha256_of(local)


class ObjectAdapterStore(IndexFileStore):
    def __init__(self, url: str, cache_dir: str | os.PathLike | None = None, **storage_options):
        import fsspec

        self.url = url.rstrip("/")
        try:
            self.fs, root = fsspec.core.url_to_fs(self.url, **storage_options)
        except (ImportError, ValueError) as exc:
            raise StoreError(f"cannot open adapter store {self.url}: {exc} "
                             "(for s3:// install the 's3' extra: pip install 'lamp-serve[s3]')") from None
        self.root = root.rstrip("/")
        self.index_path = f"{self.root}/{INDEX_NAME}"
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.conditional = any(p in CONDITIONAL_PROTOCOLS for p in protocols)
        if not self.conditional:
            log.warning("adapter store %s: this backend has no conditional writes; run one admin writer at a time",
                        self.url)
        digest = hashlib.sha256(self.url.encode("utf-8")).hexdigest()[:16]
        self.cache_dir = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "lamp-store-cache" / digest
        self._key_lock = threading.Lock()
        self._key: object = ()
        self._checked_at = float("-inf")

    def __repr__(self) -> str:
        return f"ObjectAdapterStore({self.url!r})"

    # ---- reading ---------------------------------------------------------------------------------

    def change_key(self):
        """The index's ETag (None: no index yet), from one HEAD at most every CHECK_INTERVAL_S."""
        with self._key_lock:
            if time.monotonic() - self._checked_at < CHECK_INTERVAL_S:
                return self._key
        try:
            key = self._fetch_key()
        except StoreError as exc:  # keep serving what is loaded; the next check tries again
            log.warning("%s", exc)
            key = self._key
        with self._key_lock:
            self._key, self._checked_at = key, time.monotonic()
        return key

    def _fetch_key(self):
        try:
            info = self.fs.info(self.index_path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot check adapter index {self.url}/{INDEX_NAME}: {exc}") from None
        etag = info.get("ETag") or info.get("etag")
        if etag:
            return etag
        # Backends without an ETag: whatever of these they report changes when the object is replaced.
        return tuple(str(info.get(k)) for k in ("generation", "md5Hash", "mtime", "LastModified", "last_modified",
                                                  "created", "size"))

    def read_index(self) -> StoreIndex:
        return self._read_index_and_key()[0]

    def _read_index_and_key(self) -> tuple[StoreIndex, object]:
        """The index and the key it was read under: the write that follows is conditional on that key."""
        self.fs.invalidate_cache(self.index_path)
        key = self._fetch_key()
        if key is None:
            return StoreIndex(), None
        source = f"{self.url}/{INDEX_NAME}"
        try:
            text = self.fs.cat_file(self.index_path).decode("utf-8")
        except FileNotFoundError:  # deleted between HEAD and GET: read it again
            return self._read_index_and_key()
        except (OSError, UnicodeDecodeError) as exc:
            raise StoreError(f"cannot read adapter index {source}: {exc}") from None
        return StoreIndex.parse(text, source), key

    def object_path(self, stored: StoredAdapter) -> str:
        return f"{self.root}/{stored.relative_path}"

    def path_of(self, stored: StoredAdapter) -> Path:
        """A local copy of the version (downloaded once: versions never change)."""
        local = self.cache_dir / stored.task_id / f"v{stored.version}-{stored.sha256[:16]}.safetensors"
        if local.exists():
            return local
        local.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".download.", dir=local.parent)
        os.close(fd)
        try:
            self.fs.get_file(self.object_path(stored), tmp_name)
            os.replace(tmp_name, local)
        finally:
            Path(tmp_name).unlink(missing_ok=True)
        self._prune_cache(local.parent, keep=local)
        return local

    @staticmethod
    def _prune_cache(task_dir: Path, keep: Path) -> None:
        copies = sorted(task_dir.glob("v*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in copies[CACHED_VERSIONS:]:
            if old != keep:
                old.unlink(missing_ok=True)

    # ---- writing ---------------------------------------------------------------------------------

    def put(self, task_id: str, write_file: Callable[[Path], None], facts: AdapterFacts, source: str = "upload",
            verify: Callable[[Path], None] | None = None, bundled_sha: str | None = None) -> StoredAdapter | None:
        """Same contract as `AdapterStore.put`: upload a new immutable version, then make it current."""
        self.check_task_id(task_id)
        if bundled_sha is not None and self.read_index().bundled.get(task_id) == bundled_sha:
            return None
        data, sha = staged_upload(write_file, verify)
        version = self._upload_version(task_id, data)
        stored = StoredAdapter.written(task_id, version, facts, len(data), sha, source)

        def make_current(index: StoreIndex) -> bool:
            if bundled_sha is not None and index.bundled.get(task_id) == bundled_sha:
                return False  # another replica imported the same bundled file meanwhile
            index.tasks[task_id] = stored
            index.last_versions[task_id] = max(version, index.last_versions.get(task_id, 0))
            if bundled_sha is not None:
                index.bundled[task_id] = bundled_sha
            return True

        if not self._update_index(make_current):
            self._remove_objects([f"{self.root}/{stored.relative_path}"])
            return None
        self._prune_versions(task_id, keep_from=version - KEEP_VERSIONS + 1)
        log.info("stored adapter %s v%d in %s (%s, %d bytes)", task_id, version, self.url, facts.kind, len(data))
        return stored

    def delete(self, task_id: str) -> StoredAdapter | None:
        self.check_task_id(task_id)
        removed: list[StoredAdapter] = []

        def drop(index: StoreIndex) -> bool:
            removed.clear()
            stored = index.tasks.pop(task_id, None)
            if stored is None:
                return False
            removed.append(stored)
            return True

        if not self._update_index(drop):
            return None
        self._remove_objects(self._version_objects(task_id).values())
        log.info("deleted adapter %s (was v%d) from %s", task_id, removed[0].version, self.url)
        return removed[0]

    def put_new(self, path: str, data: bytes) -> None:
        """Write an object that must not exist yet: FileExistsError when it does, on a backend with
        conditional writes; elsewhere a plain write (one admin writer at a time, as warned at open)."""
        if self.conditional:
            self.fs.pipe_file(path, data, IfNoneMatch="*")
        else:
            self.fs.pipe_file(path, data)

    def _upload_version(self, task_id: str, data: bytes) -> int:
        index = self.read_index()
        taken = max([index.last_versions.get(task_id, 0), *self._version_objects(task_id)], default=0)
        for version in range(taken + 1, taken + 1 + CAS_ATTEMPTS):
            try:
                self.put_new(f"{self.root}/{task_id}/v{version}.safetensors", data)
                return version
            except FileExistsError:  # another writer took this number first
                continue
            except OSError as exc:
                raise StoreError(f"cannot write adapter {task_id} v{version} to {self.url}: {exc}") from None
        raise StoreError(f"adapter store {self.url}: could not find a free version number for {task_id}")

    def _update_index(self, change: Callable[[StoreIndex], bool]) -> bool:
        """Read, `change` (False: nothing to write), write conditionally; redo on a conflict."""
        for _ in range(CAS_ATTEMPTS):
            index, key = self._read_index_and_key()
            if not change(index):
                return False
            index.generation += 1
            payload = json.dumps(index.to_json(), indent=1).encode("utf-8")
            try:
                self._write_index(payload, key)
                return True
            except IndexConflict:
                time.sleep(0.05)
        raise StoreError(f"adapter index {self.url}/{INDEX_NAME} kept changing under {CAS_ATTEMPTS} attempts")

    def _write_index(self, payload: bytes, read_key) -> None:
        if not self.conditional:
            self.fs.pipe_file(self.index_path, payload)
            return
        condition = {"IfNoneMatch": "*"} if read_key is None else {"IfMatch": read_key}
        try:
            self.fs.pipe_file(self.index_path, payload, **condition)
        except FileExistsError:
            raise IndexConflict() from None
        except OSError as exc:
            # s3fs reports a failed If-Match (HTTP 412) as a generic OSError: tell it from a real
            # failure by whether the index is still the one we read.
            self.fs.invalidate_cache(self.index_path)
            if self._fetch_key() != read_key:
                raise IndexConflict() from None
            raise StoreError(f"cannot write adapter index {self.url}/{INDEX_NAME}: {exc}") from None
        finally:
            self.fs.invalidate_cache(self.index_path)

    def _version_objects(self, task_id: str) -> dict[int, str]:
        try:
            names = self.fs.ls(f"{self.root}/{task_id}", detail=False, refresh=True)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StoreError(f"cannot list versions of {task_id} in {self.url}: {exc}") from None
        found = {}
        for name in names:
            if m := VERSION_OBJECT.fullmatch(name.rstrip("/").rsplit("/", 1)[-1]):
                found[int(m.group(1))] = name
        return found

    def _prune_versions(self, task_id: str, keep_from: int) -> None:
        self._remove_objects(p for v, p in self._version_objects(task_id).items() if v < keep_from)

    def _remove_objects(self, paths) -> None:
        for path in paths:
            try:
                self.fs.rm_file(path)
            except FileNotFoundError:
                pass
            except OSError as exc:  # an orphan costs storage, not correctness
                log.warning("could not remove old adapter object %s: %s", path, exc)
