"""Where the registry's version files live: a local folder or an object store (fsspec URL).

The layout (`<task>/v<N>.safetensors`, written once, never modified) is the one stores had before
the registry existed, so such a store's files are read in place. These classes use the folder and
object-store helpers (local.py, s3.py) and add the write of one numbered file.
"""

from __future__ import annotations

import abc
import ctypes
import ctypes.util
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from ..base import AdapterStore, StoredAdapter, StoreError
from ..index_json import StoreIndex
from ..local import VERSION_FILE, StoreFolder, write_verified


def _sync_filesystem(folder: Path) -> None:
    """syncfs(2) of the file system holding `folder` (Linux); sync(2) elsewhere."""
    libc_name = ctypes.util.find_library("c")
    syncfs = getattr(ctypes.CDLL(libc_name, use_errno=True), "syncfs", None) if libc_name else None
    if syncfs is None:
        os.sync()
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        if syncfs(fd) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"syncfs of {folder} failed: {os.strerror(errno)}")
    finally:
        os.close(fd)


class VersionTaken(Exception):
    """Another writer stored this version number first: take the next one."""


@dataclass(frozen=True)
class NewVersion:
    """One version to write: `write_file(path)` fills the file, `verify(path)` re-reads it."""

    task_id: str
    version: int
    write_file: Callable[[Path], None]
    verify: Callable[[Path], None] | None = None


class VersionFiles(abc.ABC):
    """The file half of a registry store."""

    location: str

    def writers_lock(self):
        """Held around a whole put or delete: a cross-process lock where the backend has one."""
        return nullcontext()

    @abc.abstractmethod
    def read_index(self) -> StoreIndex | None:
        """The location's index.json, from before the registry (None: there is none): import only."""

    @abc.abstractmethod
    def write(self, task_id: str, version: int, write_file: Callable[[Path], None],
              verify: Callable[[Path], None] | None) -> tuple[int, str]:
        """Write, verify and store version `version` of `task_id`; its (bytes, sha256)."""

    def write_many(self, versions: list[NewVersion]) -> list[tuple[int, str] | Exception]:
        """`write` for each; a failure is that version's result, the others go on."""
        results: list[tuple[int, str] | Exception] = []
        for new in versions:
            try:
                results.append(self.write(new.task_id, new.version, new.write_file, new.verify))
            except Exception as exc:  # reported per adapter by the caller
                results.append(exc)
        return results

    @abc.abstractmethod
    def max_version(self, task_id: str) -> int:
        """The highest version file of `task_id` (0: none): a crashed writer's orphan keeps its number."""

    @abc.abstractmethod
    def path_of(self, stored: StoredAdapter) -> Path: ...

    @abc.abstractmethod
    def prune(self, task_id: str, keep_from: int) -> None: ...

    @abc.abstractmethod
    def remove_task(self, task_id: str) -> None: ...

    @abc.abstractmethod
    def versions_on_disk(self) -> dict[str, int]:
        """The highest version file of each task (a migration keeps those numbers reserved)."""


class LocalVersionFiles(VersionFiles):
    def __init__(self, root: str | Path):
        self.folder = StoreFolder(root)
        self.root = self.folder.root
        self.location = str(self.root)

    def writers_lock(self):
        # The folder's writers (the ingress, replicas importing bundled files) take turns: a
        # temporary file seen under the lock is a dead writer's.
        return self.folder.locked()

    def read_index(self):
        return self.folder.read_index()

    def write(self, task_id, version, write_file, verify):
        task_dir = self.root / task_id
        task_dir.mkdir(exist_ok=True)
        self.folder.remove_dead_writers_files(task_dir)
        target = task_dir / f"v{version}.safetensors"
        write_verified(target, write_file, verify)
        return target.stat().st_size, AdapterStore.sha256_of(target)

    def write_many(self, versions):
        """Every file to a temporary name, one file-system sync, the renames, one more sync: two
        syncs for the batch instead of two fsyncs per file (a sync waits for the disk), equally durable."""
        results: list = []
        staged: list[tuple[Path, Path]] = []
        cleaned: set[Path] = set()
        for new in versions:
            task_dir = self.root / new.task_id
            tmp = None
            try:
                if task_dir not in cleaned:  # before this batch writes its own temporary files there
                    task_dir.mkdir(exist_ok=True)
                    self.folder.remove_dead_writers_files(task_dir)
                    cleaned.add(task_dir)
                fd, name = tempfile.mkstemp(prefix=f".v{new.version}.", suffix=".tmp.safetensors", dir=task_dir)
                os.close(fd)
                tmp = Path(name)
                new.write_file(tmp)
                if new.verify is not None:
                    new.verify(tmp)
                results.append((tmp.stat().st_size, AdapterStore.sha256_of(tmp)))
                staged.append((tmp, task_dir / f"v{new.version}.safetensors"))
            except Exception as exc:  # reported per adapter by the caller
                if tmp is not None:
                    tmp.unlink(missing_ok=True)
                results.append(exc)
        _sync_filesystem(self.root)
        for tmp, target in staged:
            os.replace(tmp, target)
        _sync_filesystem(self.root)
        return results

    def max_version(self, task_id):
        task_dir = self.root / task_id
        if not task_dir.is_dir():
            return 0
        return self.folder.max_version_on_disk(task_dir)

    def path_of(self, stored):
        return self.folder.path_of(stored)

    def prune(self, task_id, keep_from):
        self.folder.prune(self.root / task_id, keep_from)

    def remove_task(self, task_id):
        shutil.rmtree(self.root / task_id, ignore_errors=True)

    def versions_on_disk(self):
        found = {}
        for task_dir in self.root.iterdir():
            if task_dir.is_dir() and not task_dir.name.startswith("."):
                versions = [int(m.group(1)) for p in task_dir.iterdir() if (m := VERSION_FILE.fullmatch(p.name))]
                if versions:
                    found[task_dir.name] = max(versions)
        return found


class ObjectVersionFiles(VersionFiles):
    def __init__(self, url: str):
        from ..s3 import ObjectFolder  # fsspec is imported only for an object store

        self.objects = ObjectFolder(url)
        self.location = self.objects.url

    def read_index(self):
        return self.objects.read_index()

    def write(self, task_id, version, write_file, verify):
        objects = self.objects
        from ..s3 import staged_upload  # with its backend, like ObjectFolder above

        data, sha = staged_upload(write_file, verify)
        try:
            objects.put_new(f"{objects.root}/{task_id}/v{version}.safetensors", data)
        except FileExistsError:
            raise VersionTaken() from None
        except OSError as exc:
            raise StoreError(f"cannot write adapter {task_id} v{version} to {objects.url}: {exc}") from None
        return len(data), sha

    def max_version(self, task_id):
        return max(self.objects.version_objects(task_id), default=0)

    def path_of(self, stored):
        return self.objects.path_of(stored)

    def prune(self, task_id, keep_from):
        self.objects.prune_versions(task_id, keep_from)

    def remove_task(self, task_id):
        self.objects.remove_objects(self.objects.version_objects(task_id).values())

    def versions_on_disk(self):
        objects = self.objects
        try:
            names = objects.fs.find(objects.root)
        except FileNotFoundError:
            return {}
        found: dict[str, int] = {}
        for name in names:
            parts = name.rstrip("/").rsplit("/", 2)
            if len(parts) == 3 and (m := VERSION_FILE.fullmatch(parts[2])):
                found[parts[1]] = max(found.get(parts[1], 0), int(m.group(1)))
        return found
