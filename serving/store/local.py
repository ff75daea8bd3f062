"""The index.json store of a local folder, as lamp-serve kept it before the registry: the registry
(registry/) imports its index once and writes its version files with the helpers here; the server
never opens it as its store.

Layout of `<root>`:
- `<task>/v<N>.safetensors`: one adapter version in our own safetensors format (PEFT uploads are
  normalised to `soft_prompt` first). Written once, never modified.
- `index.json`: which version of each task is current, the last version ever issued per task (so
  versions stay monotonic across delete + re-register), and which bundled files were imported.
- `.lock`: a file lock serialising writers (the ingress on uploads, every model replica importing
  the bundled `prompts/` at start).

Every write goes to a temporary file that is fsynced and then `os.replace`d, with the directory
fsynced after, so a reader (or a crash) sees the old or the new state, never half of one. The
adapter file is written and verified *before* the index names it: a failed or bad upload leaves the
previous version current. Readers take no lock; a replica notices a change by `stat`ing the index
(`change_key`) and rereads it only then.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from .base import (
    INDEX_NAME,
    KEEP_VERSIONS,
    LOCK_NAME,
    AdapterFacts,
    IndexFileStore,
    StoredAdapter,
    StoreError,
    StoreIndex,
)

log = logging.getLogger(__name__)

LOCK_TIMEOUT_S = 30.0
VERSION_FILE = re.compile(r"v(\d+)\.safetensors")
# `_write_atomically`'s temporary files: `.v3.k2j1x.tmp.safetensors`, `.index.q8w.tmp.json`.
TEMP_FILE = re.compile(r"\..+\.tmp\.(safetensors|json)")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_verified(target: Path, write_file: Callable[[Path], None],
                   verify: Callable[[Path], None] | None) -> None:
    """An adapter file written atomically: `write_file` fills a temporary file, `verify` (if any)
    checks it, and only then is it renamed over `target` (a bad upload never reaches its name)."""
    def write_and_verify(tmp: Path) -> None:
        write_file(tmp)
        if verify is not None:
            verify(tmp)

    _write_atomically(target, write_and_verify)


def _write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp_path)` fills a temporary file next to `target`; it is fsynced and renamed over it."""
    # Same suffix as the target (readers check it), a leading dot so listings ignore it.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


class LocalAdapterStore(IndexFileStore):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the adapter store at {self.root}: {exc.strerror}") from None
        self.index_path = self.root / INDEX_NAME
        self._lock = FileLock(str(self.root / LOCK_NAME), timeout=LOCK_TIMEOUT_S)

    # ---- reading (no lock: the index is replaced atomically) ------------------------------------

    def change_key(self) -> tuple[int, int, int] | None:
        """Cheap fingerprint of the index file; changes whenever a writer replaces it."""
        try:
            st = os.stat(self.index_path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def read_index(self) -> StoreIndex:
        try:
            text = self.index_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return StoreIndex()
        except (OSError, UnicodeDecodeError) as exc:
            raise StoreError(f"cannot read adapter index {self.index_path}: {exc}") from None
        return StoreIndex.parse(text, str(self.index_path))

    def path_of(self, stored: StoredAdapter) -> Path:
        return self.root / stored.relative_path

    # ---- writing (under the file lock) ----------------------------------------------------------

    def put(self, task_id: str, write_file: Callable[[Path], None], facts: AdapterFacts, source: str = "upload",
            verify: Callable[[Path], None] | None = None, bundled_sha: str | None = None) -> StoredAdapter | None:
        """Store a new version of `task_id` and make it current.

        `write_file(path)` writes the adapter file; `verify(path)` (optional) re-reads it and raises
        if it is not what was meant, in which case nothing changes. With `bundled_sha`, the write is
        skipped (None returned) when that bundled source was already imported for this task.
        """
        self.check_task_id(task_id)
        with self._locked():
            index = self.read_index()
            if bundled_sha is not None and index.bundled.get(task_id) == bundled_sha:
                return None
            task_dir = self.root / task_id
            task_dir.mkdir(exist_ok=True)
            self._remove_dead_writers_files(task_dir)
            version = max(index.last_versions.get(task_id, 0), self._max_version_on_disk(task_dir)) + 1
            target = task_dir / f"v{version}.safetensors"

            write_verified(target, write_file, verify)
            stored = StoredAdapter.written(task_id, version, facts, target.stat().st_size, self.sha256_of(target),
                                           source)
            index.tasks[task_id] = stored
            index.last_versions[task_id] = version
            if bundled_sha is not None:
                index.bundled[task_id] = bundled_sha
            self._write_index(index)
            self._prune(task_dir, keep_from=version - KEEP_VERSIONS + 1)
            log.info("stored adapter %s v%d (%s, %d bytes)", task_id, version, facts.kind, stored.bytes)
            return stored

    def delete(self, task_id: str) -> StoredAdapter | None:
        """Remove `task_id` (its files too); its version counter is kept. None if it was not stored."""
        self.check_task_id(task_id)
        with self._locked():
            index = self.read_index()
            stored = index.tasks.pop(task_id, None)
            if stored is None:
                return None
            self._write_index(index)
            shutil.rmtree(self.root / task_id, ignore_errors=True)
            log.info("deleted adapter %s (was v%d)", task_id, stored.version)
            return stored

    @contextmanager
    def _locked(self):
        try:
            self._lock.acquire()
        except Timeout:
            raise StoreError(f"adapter store {self.root} is locked by another writer for over "
                             f"{LOCK_TIMEOUT_S:.0f} s") from None
        try:
            yield
        finally:
            self._lock.release()

    def _write_index(self, index: StoreIndex) -> None:
        self._remove_dead_writers_files(self.root)
        index.generation += 1
        payload = json.dumps(index.to_json(), indent=1).encode("utf-8")
        _write_atomically(self.index_path, lambda tmp: tmp.write_bytes(payload))

    @staticmethod
    def _max_version_on_disk(task_dir: Path) -> int:
        """Files of versions whose index write never happened (a crash) still reserve their number."""
        versions = [int(m.group(1)) for p in task_dir.iterdir() if (m := VERSION_FILE.fullmatch(p.name))]
        return max(versions, default=0)

    @staticmethod
    def _remove_dead_writers_files(folder: Path) -> None:
        """Every write happens under the store lock, so a temporary file seen while holding it
        belongs to a writer that died mid-write; nothing reads it, and it would pile up."""
        for p in folder.iterdir():
            if TEMP_FILE.fullmatch(p.name) and p.is_file():
                p.unlink(missing_ok=True)
                log.info("removed %s, left by a writer that died mid-write", p)

    @staticmethod
    def _prune(task_dir: Path, keep_from: int) -> None:
        for p in task_dir.iterdir():
            m = VERSION_FILE.fullmatch(p.name)
            if m and int(m.group(1)) < keep_from:
                p.unlink(missing_ok=True)

