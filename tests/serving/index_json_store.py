"""A store as lamp-serve wrote it before the registry: version files plus one `index.json`.

Written here byte for byte in that format (not through the server's code, which only reads it now),
on a local folder or any fsspec URL, so the migration tests start from what an operator has on disk.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path

import fsspec

from lamp_runtime.adapters import PromptAdapter, save_adapter
from serving.store.base import INDEX_NAME, StoredAdapter
from serving.store.index_json import INDEX_FORMAT, StoreIndex


def write_index_store(location: str | Path, versions: dict[str, list[PromptAdapter]], deleted: tuple[str, ...] = (),
                      bundled: dict[str, str] | None = None) -> StoreIndex:
    """Task `t`'s adapters become its versions 1..n (n current); tasks in `deleted` keep only their
    version counter, as a delete left them; `bundled`: task -> sha256 of an imported bundled file."""
    fs, root = fsspec.core.url_to_fs(str(location))
    index = StoreIndex(generation=len(versions) + len(deleted), bundled=dict(bundled or {}))
    with tempfile.TemporaryDirectory() as tmp:
        for task_id, adapters in versions.items():
            for number, adapter in enumerate(adapters, start=1):
                local = Path(tmp) / f"{task_id}-v{number}.safetensors"
                save_adapter(adapter, local)
                data = local.read_bytes()
                stored = StoredAdapter(task_id, number, adapter.kind, adapter.prompt_tokens, adapter.pooled_tokens,
                                       len(data), hashlib.sha256(data).hexdigest(), time.time(), "upload",
                                       adapter.meta.pool)
                fs.makedirs(f"{root}/{task_id}", exist_ok=True)
                fs.pipe_file(f"{root}/{stored.relative_path}", data)
            if task_id not in deleted:
                index.tasks[task_id] = stored
            index.last_versions[task_id] = len(adapters)
    fs.pipe_file(f"{root}/{INDEX_NAME}", json.dumps(index_json(index), indent=1).encode("utf-8"))
    return index


def index_json(index: StoreIndex) -> dict:
    """The index.json document, as the store before the registry wrote it."""
    return {
        "format": INDEX_FORMAT,
        "generation": index.generation,
        "tasks": {t: a.to_json() for t, a in sorted(index.tasks.items())},
        "last_versions": dict(sorted(index.last_versions.items())),
        "bundled": dict(sorted(index.bundled.items())),
    }
