"""The adapter registry: metadata in SQL (SQLAlchemy), version files in the file store.

- tables.py: the schema (one row per task, one state row with the change sequence)
- database.py: `RegistryDatabase`, every read and write as one short transaction
- versions.py: the version files, in a local folder or an object store
- store.py: `RegistryAdapterStore`, the `AdapterStore` contract over the two (and the one-time
  import of a store written as index.json before the registry existed)
- `open_store` (here): the store at a location, with its registry

Every store has a registry. By default an SQLite file (WAL): inside a local store's folder, or, for
an object store, in this machine's state folder (`default_registry_url`), so a single machine needs
nothing else; PostgreSQL (`--registry postgresql://...`) for a cluster, next to an S3 / fsspec file store.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

from .. import is_url, state_dir
from ..base import REGISTRY_NAME, AdapterStore, StoreError

log = logging.getLogger(__name__)

DEFAULT_SCHEMES = ("sqlite", "postgresql")


def default_registry_url(location: str | os.PathLike) -> str:
    """The SQLite registry of a store given without one: inside a local store's folder (it moves
    with the folder), or for an object store in this machine's state folder, one file per store URL
    (the bucket holds no database: SQLite over an object store would not lock)."""
    text = str(location)
    if not is_url(text):
        return f"sqlite:///{Path(text).expanduser().resolve() / REGISTRY_NAME}"
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:80]
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    folder = state_dir() / "registries"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / f'{readable}-{digest}.sqlite3'}"


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
    metadata in the registry database `registry` (default: `default_registry_url`). An index.json
    found there (a store written before the registry) is imported once, on first start."""
    from .database import RegistryDatabase
    from .store import RegistryAdapterStore
    from .versions import LocalVersionFiles, ObjectVersionFiles

    text = str(location)
    if text.startswith("file://"):
        text = text[len("file://"):]
    files = ObjectVersionFiles(text) if is_url(text) else LocalVersionFiles(text)
    if registry is None:
        registry = default_registry_url(files.location)
        if is_url(text):
            log.warning("adapter store %s has no --registry: its registry is %s, on this machine only; a "
                        "cluster must share one (--registry postgresql://...)", text, registry)
    try:
        url = check_registry_url(registry)
    except ValueError as exc:
        raise StoreError(str(exc)) from None
    return RegistryAdapterStore(files, RegistryDatabase(url))
