"""The adapter store under crashes: a writer SIGKILLed at any point of `put` leaves the old or the
new version current, never a torn file; the lock dies with it; versions stay monotonic.

Also a regression test: task ids that name the store's own files (`index.json`, the registry's
SQLite file) are refused; a first upload named `index.json` once turned the index path into a folder
and broke the store.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lamp_runtime.adapters import AdapterLimits, load_adapter, save_adapter
from lamp_runtime.adapters.registry import AdapterRegistry
from lamp_runtime.errors import AdapterError
from lamp_runtime.prompts.cache import PromptCache
from serving.store.files import facts_of, load_stored
from serving.store.base import AdapterStore
from serving.store.registry import open_store
from serving.store.sync import StoreSync

from .crashing_writer import REGISTRY_POINTS
from .hostile_files import HIDDEN

REPO_ROOT = Path(__file__).resolve().parents[2]
PAUSE_TIMEOUT_S = 120.0
LIMITS = AdapterLimits()


def soft_prompt(seed: int, tmp_path: Path) -> Path:
    from lamp_runtime.adapters import AdapterMeta, SoftPromptAdapter

    prompt = torch.randn(6, HIDDEN, generator=torch.Generator().manual_seed(seed)) * 0.02
    return save_adapter(SoftPromptAdapter(AdapterMeta(), prompt), tmp_path / f"seed{seed}.safetensors")


def put_file(store: AdapterStore, task_id: str, source: Path):
    adapter = load_adapter(source, HIDDEN, LIMITS)
    data = source.read_bytes()
    return store.put(task_id, lambda path: path.write_bytes(data), facts_of(adapter, 576),
                     verify=lambda path: load_adapter(path, HIDDEN, LIMITS))


def crash_writer_at(store_dir: Path, task_id: str, source: Path, point: str, registry_url: str) -> str:
    """Run the writer until it reports `point`, SIGKILL it there; return its last line."""
    writer = subprocess.Popen([sys.executable, "-m", "tests.reliability.crashing_writer", str(store_dir), task_id,
                               str(source), point, registry_url], cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + PAUSE_TIMEOUT_S
    line = ""
    try:
        while time.monotonic() < deadline:
            line = writer.stdout.readline().strip()
            if line.startswith(("PAUSED", "STORED")) or not line and writer.poll() is not None:
                break
        if line.startswith("PAUSED"):
            os.kill(writer.pid, signal.SIGKILL)
        writer.wait(30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        writer.stdout.close()
    return line


def same_prompt(path: Path, source: Path) -> bool:
    return torch.equal(load_adapter(path, HIDDEN).prompt, load_adapter(source, HIDDEN).prompt)


def test_the_writer_completes_when_not_killed(tmp_path, registry_url):
    """The crash points below are real points of the write path: without a kill it stores."""
    store_dir = tmp_path / "store"
    source = soft_prompt(3, tmp_path)
    assert crash_writer_at(store_dir, "task", source, "none", registry_url) == "STORED v1"
    store = open_store(store_dir, registry_url)
    assert same_prompt(store.path_of(store.get("task")), source)


@pytest.mark.parametrize("point", REGISTRY_POINTS)
def test_sigkill_at_any_point_of_a_registry_write_leaves_old_or_new(tmp_path, registry_url, point):
    """The registry store (SQLite and PostgreSQL): the row that makes a version current commits only
    after its file is complete, so a kill anywhere leaves old or new, never a torn file."""
    store_dir = tmp_path / "store"
    old, new = soft_prompt(1, tmp_path), soft_prompt(2, tmp_path)
    store = open_store(store_dir, registry_url)
    put_file(store, "task", old)
    before = put_file(store, "task", old)
    seq = store.change_key()

    assert crash_writer_at(store_dir, "task", new, point, registry_url) == f"PAUSED {point}"

    store = open_store(store_dir, registry_url)  # a fresh handle, as a restarted server opens it
    current = store.get("task")
    completed = point == "prune"
    assert current.version == before.version + (1 if completed else 0)
    assert store.change_key() == seq + (1 if completed else 0)
    assert same_prompt(store.path_of(current), new if completed else old)
    load_stored(store.path_of(current), current.sha256, HIDDEN, LIMITS)
    for path in (store_dir / "task").iterdir():  # every file a reader could open is complete
        if not path.name.startswith("."):
            load_adapter(path, HIDDEN, LIMITS)

    # The dead writer's locks are gone (file lock, database transaction), a number it stored is not reused,
    # and a replica starting now loads exactly the committed state.
    on_disk = max(int(p.stem[1:]) for p in (store_dir / "task").glob("v*.safetensors"))
    after = put_file(store, "task", new)
    assert after.version > max(on_disk, current.version)
    assert same_prompt(store.path_of(after), new)
    assert [p.name for p in (store_dir / "task").iterdir() if ".tmp." in p.name] == []
    registry = AdapterRegistry()
    StoreSync(store, registry, PromptCache(1 << 20), HIDDEN, LIMITS).refresh()
    assert registry.get("task").version == after.version


@pytest.mark.parametrize("reserved", ["index.json", "registry.sqlite3"])
def test_task_ids_naming_store_files_are_refused_and_the_store_keeps_working(tmp_path, reserved):
    store = open_store(tmp_path / "store")
    source = soft_prompt(4, tmp_path)
    with pytest.raises(AdapterError, match="reserved by the adapter store"):
        put_file(store, reserved, source)
    with pytest.raises(AdapterError, match="reserved by the adapter store"):
        store.delete(reserved)
    assert not (tmp_path / "store" / reserved).is_dir()  # no task folder took the name
    assert (tmp_path / "store" / reserved).exists() == (reserved == "registry.sqlite3")  # only the registry's own
    assert put_file(store, "fine", source).version == 1
    assert [a.task_id for a in store.list()] == ["fine"]
