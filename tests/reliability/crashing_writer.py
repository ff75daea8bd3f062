"""A store writer that stops dead at a chosen point of the registry store's `put`, for SIGKILL tests.

    python -m tests.reliability.crashing_writer STORE TASK ADAPTER_FILE POINT REGISTRY_URL

registers ADAPTER_FILE as the next version of TASK through the real store (`open_store`, as the
server opens it), but at POINT it prints `PAUSED POINT` and sleeps, so the parent can SIGKILL it
exactly there. POINT `none` completes the write. REGISTRY_POINTS cover every state a crash can leave:

- `adapter-partial`: half the adapter bytes are in the temporary file
- `adapter-rename`: the adapter temporary file is complete and fsynced, not yet renamed
- `row-uncommitted`: the row making the version current is written, its transaction not committed
- `prune`: committed; older versions not yet pruned
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REGISTRY_POINTS = ("adapter-partial", "adapter-rename", "row-uncommitted", "prune")


def pause(point: str) -> None:
    print(f"PAUSED {point}", flush=True)
    while True:
        time.sleep(60)


def registry_main(store_dir: str, task_id: str, adapter_file: str, point: str, registry_url: str) -> None:
    from lamp_runtime.adapters import AdapterLimits, load_adapter
    from serving.store.registry import open_store
    from serving.store.files import facts_of
    from serving.store.registry import database
    from serving.store.registry.versions import LocalVersionFiles

    data = Path(adapter_file).read_bytes()
    adapter = load_adapter(adapter_file, hidden_size=576)
    real_replace = os.replace
    real_exit, real_prune = database._Transaction.__exit__, LocalVersionFiles.prune

    def replace(src, dst):
        if point == "adapter-rename":
            pause(point)
        real_replace(src, dst)

    def write_adapter(path: Path) -> None:
        with open(path, "wb") as f:
            if point == "adapter-partial":
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                pause(point)
            f.write(data)

    def exit_(self, exc_type, exc, tb):
        if point == "row-uncommitted" and self.write and exc_type is None and making_current:
            pause(point)
        return real_exit(self, exc_type, exc, tb)

    real_make_current = database.RegistryDatabase.make_current
    making_current = False

    def make_current(self, *args, **kwargs):
        nonlocal making_current
        making_current = True
        return real_make_current(self, *args, **kwargs)

    def prune(self, task_id, keep_from):
        if point == "prune":
            pause(point)
        real_prune(self, task_id, keep_from)

    store = open_store(store_dir, registry_url)
    os.replace = replace
    database.RegistryDatabase.make_current = make_current
    database._Transaction.__exit__ = exit_
    LocalVersionFiles.prune = prune
    stored = store.put(task_id, write_adapter, facts_of(adapter, 576),
                       verify=lambda path: load_adapter(path, 576, AdapterLimits()))
    print(f"STORED v{stored.version}", flush=True)


if __name__ == "__main__":
    registry_main(*sys.argv[1:6])
