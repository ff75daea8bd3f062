"""The persistent adapter store, shared by the ingress (admin API) and every model replica.

- base.py: the `AdapterStore` contract, `StoredAdapter` / `StoreIndex` records, `StoreError`
- registry/: the default: metadata and the change sequence in SQL (SQLite under the store folder, or
  PostgreSQL), version files in a folder or an object store; replicas sync by change number
- local.py: a directory (atomic writes under a file lock); s3.py: S3 or any fsspec URL (CAS on the index):
  the index.json stores, imported into the registry on first start (and still used for an object
  store given without `--registry`)
- files.py: adapters in and out of the store (uploads, bundled `prompts/`, stored versions)
- sync.py: keeps a replica's in-memory registry equal to the store
- admin.py: the admin API's logic (register / list / get / delete)
"""

from __future__ import annotations

import logging
import os

from .base import AdapterStore, StoredAdapter, StoreError

log = logging.getLogger(__name__)


def is_url(location: str | os.PathLike | None) -> bool:
    """A URL (`s3://...`, `file://...`) rather than a path of this machine."""
    return location is not None and "://" in str(location)


def open_store(location: str | os.PathLike, registry: str | None = None) -> AdapterStore:
    """The store at `location` (a local directory, a `file://` URL or any other fsspec URL), with its
    metadata in the registry database `registry` (default: SQLite inside a local `location`).

    An object store without a registry keeps its index.json (one writer-serialised file, O(tasks)
    per change): a cluster should name a PostgreSQL registry."""
    from .registry import check_registry_url, default_registry_url
    from .registry.database import RegistryDatabase
    from .registry.store import RegistryAdapterStore
    from .registry.versions import LocalVersionFiles, ObjectVersionFiles

    text = str(location)
    if text.startswith("file://"):
        text = text[len("file://"):]
    if is_url(text):
        if registry is None:
            from .s3 import ObjectAdapterStore

            log.warning("adapter store %s has no --registry: using its index.json (every change rewrites it; "
                        "give a postgresql:// registry for many tasks)", text)
            return ObjectAdapterStore(text)
        files = ObjectVersionFiles(text)
    else:
        files = LocalVersionFiles(text)
        registry = registry or default_registry_url(files.root)
    try:
        url = check_registry_url(registry)
    except ValueError as exc:
        raise StoreError(str(exc)) from None
    return RegistryAdapterStore(files, RegistryDatabase(url))


__all__ = ["AdapterStore", "StoreError", "StoredAdapter", "is_url", "open_store"]
