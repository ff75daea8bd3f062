"""The index.json of a store written before the registry: its current versions, version counters
and bundled-import record. Only read, by the registry's one-time import (registry/store.py), from a
folder (local.py) or an object store (s3.py); nothing writes it any more.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .base import StoredAdapter, StoreError

INDEX_FORMAT = 1


@dataclass
class StoreIndex:
    """A store's index.json, as lamp-serve wrote it before the registry."""

    generation: int = 0
    tasks: dict[str, StoredAdapter] = field(default_factory=dict)
    last_versions: dict[str, int] = field(default_factory=dict)
    bundled: dict[str, str] = field(default_factory=dict)  # task id -> sha256 of the imported source

    @classmethod
    def parse(cls, text: str, source: str) -> "StoreIndex":
        """The index from its file's text; any problem is a StoreError naming `source`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StoreError(f"adapter index {source} is not valid JSON ({exc}); fix or remove it") from None
        if not isinstance(data, dict):
            raise StoreError(f"adapter index {source} must be a JSON object")
        return cls.from_json(data, source)

    @classmethod
    def from_json(cls, data: dict, source: str) -> "StoreIndex":
        try:
            if data.get("format") != INDEX_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {INDEX_FORMAT}")
            return cls(
                generation=int(data["generation"]),
                tasks={t: StoredAdapter.from_json(a) for t, a in data["tasks"].items()},
                last_versions={t: int(v) for t, v in data["last_versions"].items()},
                bundled={t: str(s) for t, s in data.get("bundled", {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StoreError(f"adapter index {source} is damaged ({exc!r}); fix or remove it") from None
