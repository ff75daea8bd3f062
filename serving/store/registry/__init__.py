"""The adapter registry: metadata in SQL (SQLAlchemy), version files in the file store.

- tables.py: the schema (one row per task, one state row with the change sequence)
- database.py: `RegistryDatabase`, every read and write as one short transaction
- versions.py: the version files, in a local folder or an object store
- store.py: `RegistryAdapterStore`, the `AdapterStore` contract over the two
- `open_store` (here): the store at a location, the registry's or (an object store given without a
  registry) an index.json store

SQLite (WAL) under the store folder by default, so a single machine needs nothing else;
PostgreSQL (`--registry postgresql://...`) for a cluster, next to an S3 / fsspec file store.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .. import is_url
from ..base import REGISTRY_NAME, AdapterStore, StoreError

log = logging.getLogger(__name__)

DEFAULT_SCHEMES = ("sqlite", "postgresql")


def default_registry_url(store_dir: str | Path) -> str:
    """The embedded SQLite database inside a local store's folder."""
    return f"sqlite:///{Path(store_dir).expanduser().resolve() / REGISTRY_NAME}"


def check_registry_url(url: str) -> str:
    """`url` if SQLAlchemy can open it with a driver we ship; a ValueError naming the problem otherwise."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme.split("+", 1)[0] not in DEFAULT_SCHEMES:
        raise ValueError(f"registry must be an sqlite:///PATH or postgresql://USER@HOST/DB URL, got scheme "
                         f"{scheme or 'none'!r}")
    if scheme == "postgresql":  # psycopg 3, not SQLAlchemy's default psycopg2
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def open_store(location: str | os.PathLike, registry: str | None = None) -> AdapterStore:
    """The store at `location` (a local directory, a `file://` URL or any other fsspec URL), with its
    metadata in the registry database `registry` (default: SQLite inside a local `location`).

    An object store without a registry keeps its index.json (one writer-serialised file, O(tasks)
    per change): a cluster should name a PostgreSQL registry."""
    from .database import RegistryDatabase
    from .store import RegistryAdapterStore
    from .versions import LocalVersionFiles, ObjectVersionFiles

    text = str(location)
    if text.startswith("file://"):
        text = text[len("file://"):]
    if is_url(text):
        if registry is None:
            from ..s3 import ObjectAdapterStore

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
