"""Where the registry's version files live: a local folder or an object store (fsspec URL).

The layout is the index stores' (`<task>/v<N>.safetensors`, written once, never modified), so a
store written before the registry existed is read in place. These classes reuse the index stores'
file helpers (local.py, s3.py) and add nothing of their own but the write of one numbered file.
"""

from __future__ import annotations

import abc
import shutil
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from ..base import AdapterStore, StoredAdapter, StoreError
from ..local import VERSION_FILE, LocalAdapterStore, _write_atomically


class VersionTaken(Exception):
    """The version object already exists (a crashed writer's orphan): reserve another number."""


class VersionFiles(abc.ABC):
    """The file half of a registry store."""

    index_store: AdapterStore  # the same location read as an index.json store (migration)
    location: str

    def writers_lock(self):
        """Held around a whole put or delete: a cross-process lock where the backend has one."""
        return nullcontext()

    @abc.abstractmethod
    def write(self, task_id: str, version: int, write_file: Callable[[Path], None],
              verify: Callable[[Path], None] | None) -> tuple[int, str]:
        """Write, verify and store version `version` of `task_id`; its (bytes, sha256)."""

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
        self.index_store = LocalAdapterStore(root)
        self.root = self.index_store.root
        self.location = str(self.root)

    def writers_lock(self):
        # The folder's writers (the ingress, replicas importing bundled files) take turns, as they
        # did before the registry: a temporary file seen under the lock is a dead writer's.
        return self.index_store._locked()

    def write(self, task_id, version, write_file, verify):
        task_dir = self.root / task_id
        task_dir.mkdir(exist_ok=True)
        self.index_store._remove_dead_writers_files(task_dir)
        target = task_dir / f"v{version}.safetensors"

        def write_and_verify(tmp: Path) -> None:
            write_file(tmp)
            if verify is not None:
                verify(tmp)

        _write_atomically(target, write_and_verify)
        return target.stat().st_size, AdapterStore.sha256_of(target)

    def path_of(self, stored):
        return self.index_store.path_of(stored)

    def prune(self, task_id, keep_from):
        self.index_store._prune(self.root / task_id, keep_from)

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
        from ..s3 import ObjectAdapterStore

        self.index_store = ObjectAdapterStore(url)
        self.location = self.index_store.url

    def write(self, task_id, version, write_file, verify):
        objects = self.index_store
        with tempfile.TemporaryDirectory(prefix="lamp-upload-") as tmp_dir:
            local = Path(tmp_dir) / "adapter.safetensors"
            write_file(local)
            if verify is not None:
                verify(local)
            data = local.read_bytes()
            sha = AdapterStore.sha256_of(local)
        path = f"{objects.root}/{task_id}/v{version}.safetensors"
        try:
            if objects.conditional:
                objects.fs.pipe_file(path, data, IfNoneMatch="*")
            else:
                objects.fs.pipe_file(path, data)
        except FileExistsError:
            raise VersionTaken() from None
        except OSError as exc:
            raise StoreError(f"cannot write adapter {task_id} v{version} to {objects.url}: {exc}") from None
        return len(data), sha

    def path_of(self, stored):
        return self.index_store.path_of(stored)

    def prune(self, task_id, keep_from):
        self.index_store._prune_versions(task_id, keep_from)

    def remove_task(self, task_id):
        self.index_store._remove_objects(self.index_store._version_objects(task_id).values())

    def versions_on_disk(self):
        objects = self.index_store
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
