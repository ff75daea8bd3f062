"""A store's files on an object store or any other fsspec URL (`s3://bucket/prefix`, `gs://...`):
the version objects the registry writes (registry/versions.py), and the reader of an index.json the
prefix may hold from before the registry.

Layout: `<prefix>/<task>/v<N>.safetensors` objects, written once and never modified (the local
folder's layout, local.py). Each is uploaded whole, after it was written and verified locally, with
`If-None-Match: *` on S3, so two writers can never store the same version number (the loser takes
the next one). Version objects are downloaded once (into a local cache) when first needed.
Other fsspec backends have no conditional PUT: there keep to one admin writer at a time (a warning
says so at start).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from .base import INDEX_NAME, AdapterStore, StoredAdapter, StoreError
from .index_json import StoreIndex

log = logging.getLogger(__name__)

VERSION_OBJECT = re.compile(r"v(\d+)\.safetensors")
CONDITIONAL_PROTOCOLS = ("s3", "s3a")
CACHED_VERSIONS = 2  # local copies kept per task


def staged_upload(write_file: Callable[[Path], None], verify: Callable[[Path], None] | None) -> tuple[bytes, str]:
    """An adapter file's bytes and sha256, written (and verified, if asked) in a local temporary
    folder first: an object store gets one whole object, and only one that passed the checks."""
    with tempfile.TemporaryDirectory(prefix="lamp-upload-") as tmp_dir:
        local = Path(tmp_dir) / "adapter.safetensors"
        write_file(local)
        if verify is not None:
            verify(local)
        return local.read_bytes(), AdapterStore.sha256_of(local)


class ObjectFolder:
    """The objects of a store at an fsspec URL, without its metadata (that is the registry's)."""

    def __init__(self, url: str, cache_dir: str | os.PathLike | None = None, **storage_options):
        import fsspec

        self.url = url.rstrip("/")
        try:
            self.fs, root = fsspec.core.url_to_fs(self.url, **storage_options)
        except (ImportError, ValueError) as exc:
            raise StoreError(f"cannot open adapter store {self.url}: {exc} "
                             "(for s3:// install the 's3' extra: pip install 'lamp-serve[s3]')") from None
        self.root = root.rstrip("/")
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.conditional = any(p in CONDITIONAL_PROTOCOLS for p in protocols)
        if not self.conditional:
            log.warning("adapter store %s: this backend has no conditional writes; run one admin writer at a time",
                        self.url)
        digest = hashlib.sha256(self.url.encode("utf-8")).hexdigest()[:16]
        self.cache_dir = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "lamp-store-cache" / digest

    def __repr__(self) -> str:
        return f"ObjectFolder({self.url!r})"

    def read_index(self) -> StoreIndex | None:
        """The prefix's index.json, for the registry's one-time import (None: there is none)."""
        source = f"{self.url}/{INDEX_NAME}"
        try:
            text = self.fs.cat_file(f"{self.root}/{INDEX_NAME}").decode("utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise StoreError(f"cannot read adapter index {source}: {exc}") from None
        return StoreIndex.parse(text, source)

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

    def put_new(self, path: str, data: bytes) -> None:
        """Write an object that must not exist yet: FileExistsError when it does, on a backend with
        conditional writes; elsewhere a plain write (one admin writer at a time, as warned at open)."""
        if self.conditional:
            self.fs.pipe_file(path, data, IfNoneMatch="*")
        else:
            self.fs.pipe_file(path, data)

    def version_objects(self, task_id: str) -> dict[int, str]:
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

    def prune_versions(self, task_id: str, keep_from: int) -> None:
        self.remove_objects(p for v, p in self.version_objects(task_id).items() if v < keep_from)

    def remove_objects(self, paths: Iterable[str]) -> None:
        for path in paths:
            try:
                self.fs.rm_file(path)
            except FileNotFoundError:
                pass
            except OSError as exc:  # an orphan costs storage, not correctness
                log.warning("could not remove old adapter object %s: %s", path, exc)
