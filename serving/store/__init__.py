"""The persistent adapter store, shared by the ingress (admin API) and every model replica.

- base.py: the `AdapterStore` contract, `StoredAdapter` / `StoreIndex` records, `StoreError`
- registry/: the default, and `open_store` (which picks the backend): metadata and the change
  sequence in SQL (SQLite under the store folder, or PostgreSQL), version files in a folder or an
  object store; replicas sync by change number
- local.py: a directory (atomic writes under a file lock); s3.py: S3 or any fsspec URL (CAS on the index):
  the index.json stores, imported into the registry on first start (and still used for an object
  store given without `--registry`)
- files.py: adapters in and out of the store (uploads, bundled `prompts/`, stored versions)
- sync.py: keeps a replica's in-memory registry equal to the store

The admin API's logic over the store is serving/admin.py.
"""

from __future__ import annotations

import os

from .base import AdapterStore, StoredAdapter, StoreError


def is_url(location: str | os.PathLike | None) -> bool:
    """A URL (`s3://...`, `file://...`) rather than a path of this machine."""
    return location is not None and "://" in str(location)


__all__ = ["AdapterStore", "StoreError", "StoredAdapter", "is_url"]
