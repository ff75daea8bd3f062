"""The persistent adapter store, shared by the ingress (admin API) and every model replica.

- base.py: the `AdapterStore` contract, the `StoredAdapter` record, `StoreError`
- index_json.py: the reader of an index.json (the store's format before the registry), for the
  one-time import
- registry/: the store, and `open_store`: metadata and the change sequence in SQL (SQLite under
  the store folder or this machine's state folder, or PostgreSQL), version files in a folder or an
  object store; replicas sync by change number
- local.py, s3.py: the version files in a folder or an object store, and where an index.json is read
  from, to import it into the registry once on first start
- files.py: adapters in and out of the store (uploads, bundled `prompts/`, stored versions)
- sync.py: keeps a replica's in-memory registry equal to the store

The admin API's logic over the store is serving/admin.py.
"""

from __future__ import annotations

import os
from pathlib import Path

from .base import AdapterStore, StoredAdapter, StoreError


def state_dir() -> Path:
    """This machine's lamp-serve folder (the user data dir): the default local store, and the
    default registries of object stores given without one."""
    from platformdirs import user_data_dir

    return Path(user_data_dir("lamp-serve"))


def is_url(location: str | os.PathLike | None) -> bool:
    """A URL (`s3://...`, `file://...`) rather than a path of this machine."""
    return location is not None and "://" in str(location)


__all__ = ["AdapterStore", "StoreError", "StoredAdapter", "is_url", "state_dir"]
