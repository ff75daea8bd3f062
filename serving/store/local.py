"""A local store folder's files: the version files the registry writes (registry/versions.py), the
writers' lock, and the reader of an index.json the folder may hold from before the registry.

Layout of `<root>`:
- `<task>/v<N>.safetensors`: one adapter version in our own safetensors format (PEFT uploads are
  normalised to `soft_prompt` first). Written once, never modified.
- `.lock`: a file lock serialising writers (the ingress on uploads, every model replica importing
  the bundled `prompts/` at start).
- `index.json` (stores written before the registry only): read once, by the registry's import.

Every file is written to a temporary file that is fsynced and then `os.replace`d, with the directory
fsynced after, so a reader (or a crash) sees the old file or the new one, never half of one; the
adapter file is verified before it takes its name.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from .base import INDEX_NAME, LOCK_NAME, StoredAdapter, StoreError
from .index_json import StoreIndex

log = logging.getLogger(__name__)

LOCK_TIMEOUT_S = 30.0
VERSION_FILE = re.compile(r"v(\d+)\.safetensors")
# `_write_atomically`'s temporary files: `.v3.k2j1x.tmp.safetensors`.
TEMP_FILE = re.compile(r"\..+\.tmp\.safetensors")


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


class StoreFolder:
    """The files of a local store folder, without its metadata (that is the registry's)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the adapter store at {self.root}: {exc.strerror}") from None
        self.index_path = self.root / INDEX_NAME
        self._lock = FileLock(str(self.root / LOCK_NAME), timeout=LOCK_TIMEOUT_S)

    def path_of(self, stored: StoredAdapter) -> Path:
        return self.root / stored.relative_path

    @contextmanager
    def locked(self):
        """The folder's writers take turns: a temporary file seen under the lock is a dead writer's."""
        try:
            self._lock.acquire()
        except Timeout:
            raise StoreError(f"adapter store {self.root} is locked by another writer for over "
                             f"{LOCK_TIMEOUT_S:.0f} s") from None
        try:
            yield
        finally:
            self._lock.release()

    def read_index(self) -> StoreIndex | None:
        """The folder's index.json, for the registry's one-time import (None: there is none)."""
        try:
            text = self.index_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise StoreError(f"cannot read adapter index {self.index_path}: {exc}") from None
        return StoreIndex.parse(text, str(self.index_path))

    @staticmethod
    def max_version_on_disk(task_dir: Path) -> int:
        """Files of versions no record names (a crashed writer's) still reserve their number."""
        versions = [int(m.group(1)) for p in task_dir.iterdir() if (m := VERSION_FILE.fullmatch(p.name))]
        return max(versions, default=0)

    @staticmethod
    def remove_dead_writers_files(folder: Path) -> None:
        """Every write happens under the store lock, so a temporary file seen while holding it
        belongs to a writer that died mid-write; nothing reads it, and it would pile up."""
        for p in folder.iterdir():
            if TEMP_FILE.fullmatch(p.name) and p.is_file():
                p.unlink(missing_ok=True)
                log.info("removed %s, left by a writer that died mid-write", p)

    @staticmethod
    def prune(task_dir: Path, keep_from: int) -> None:
        for p in task_dir.iterdir():
            m = VERSION_FILE.fullmatch(p.name)
            if m and int(m.group(1)) < keep_from:
                p.unlink(missing_ok=True)
