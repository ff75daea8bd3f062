"""The adapter registry: metadata in SQL (SQLAlchemy), version files in the file store.

- tables.py: the schema (one row per task, one state row with the change sequence)
- database.py: `RegistryDatabase`, every read and write as one short transaction
- versions.py: the version files, in a local folder or an object store
- store.py: `RegistryAdapterStore`, the `AdapterStore` contract over the two

SQLite (WAL) under the store folder by default, so a single machine needs nothing else;
PostgreSQL (`--registry postgresql://...`) for a cluster, next to an S3 / fsspec file store.
"""

from __future__ import annotations

from pathlib import Path

from ..base import REGISTRY_NAME

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
