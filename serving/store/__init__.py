"""The persistent adapter store, shared by the ingress (admin API) and every model replica.

- base.py: the `AdapterStore` contract, `StoredAdapter` / `StoreIndex` records, `StoreError`
- local.py: a directory (atomic writes under a file lock); s3.py: S3 or any fsspec URL (CAS on the index)
- files.py: adapters in and out of the store (uploads, bundled `prompts/`, stored versions)
- sync.py: keeps a replica's in-memory registry equal to the store
- admin.py: the admin API's logic (register / list / get / delete)
"""

from __future__ import annotations

import os

from .base import AdapterStore, StoredAdapter, StoreError


def is_url(location: str | os.PathLike | None) -> bool:
    """A URL (`s3://...`, `file://...`) rather than a path of this machine."""
    return location is not None and "://" in str(location)


def open_store(location: str | os.PathLike) -> AdapterStore:
    """The store at `location`: a local directory (or `file://` URL) or any other fsspec URL."""
    from .local import LocalAdapterStore

    text = str(location)
    if text.startswith("file://"):
        return LocalAdapterStore(text[len("file://"):])
    if is_url(text):
        from .s3 import ObjectAdapterStore

        return ObjectAdapterStore(text)
    return LocalAdapterStore(text)


__all__ = ["AdapterStore", "StoreError", "StoredAdapter", "is_url", "open_store"]
