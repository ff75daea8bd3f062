"""A replica starts from the registry's rows alone: no adapter file is opened until a request needs it.

Counted exactly: every open of a `.safetensors` file in the process (io.open, which Path.read_bytes
and the built-in open go through) and every `path_of` the sync or the resident cache asks the store.
SQLite and PostgreSQL (the `registry_url` fixture).
"""

from __future__ import annotations

import builtins
import io

import pytest
import torch

from lamp_runtime.adapters import AdapterLimits, AdapterMeta, LampAdapter, save_adapter
from lamp_runtime.adapters.registry import AdapterRegistry, StoredEntry
from lamp_runtime.engine.resident import ResidentAdapters
from lamp_runtime.errors import UnservableTaskError
from lamp_runtime.prompts.cache import PromptCache
from serving.store.base import NewAdapter
from serving.store.files import facts_of, store_adapter
from serving.store.registry import open_store
from serving.store.sync import StoreSync

HIDDEN = 16
LIMITS = AdapterLimits()
TASKS = 5000


def lamp(seed: int, template: str | None = None) -> LampAdapter:
    g = torch.Generator().manual_seed(seed)
    extra = {"input_template": template} if template else {}
    return LampAdapter(AdapterMeta(pool=2, task="t", extra=extra), torch.randn(10, 4, generator=g) * 0.1,
                       torch.rand(4, generator=g) + 0.5, torch.randn(4, HIDDEN, generator=g) * 0.1)


class FileReads:
    """Opens of `.safetensors` files and the store's `path_of` calls, while counting."""

    def __init__(self, monkeypatch, store):
        self.opened: list[str] = []
        self.paths: list[str] = []
        real_open, real_path_of = io.open, store.path_of

        def counting_open(file, *args, **kwargs):
            if str(file).endswith(".safetensors"):
                self.opened.append(str(file))
            return real_open(file, *args, **kwargs)

        def counting_path_of(stored):
            self.paths.append(f"{stored.task_id} v{stored.version}")
            return real_path_of(stored)

        monkeypatch.setattr(io, "open", counting_open)
        monkeypatch.setattr(builtins, "open", counting_open)
        monkeypatch.setattr(store, "path_of", counting_path_of)


@pytest.fixture()
def store(tmp_path, registry_url):
    return open_store(tmp_path / "files", registry_url)


def fill(store, tmp_path, count: int) -> LampAdapter:
    adapter = lamp(0, template="Q: {input}\nA:")
    data = save_adapter(adapter, tmp_path / "src.safetensors").read_bytes()
    facts = facts_of(adapter, HIDDEN)
    outcomes = store.put_many([NewAdapter(f"task-{i:05d}", lambda p: p.write_bytes(data), facts)
                               for i in range(count)])
    assert not [o for o in outcomes if isinstance(o, Exception)]
    return adapter


def test_a_replica_starts_on_5000_tasks_without_opening_a_file_and_reads_one_on_first_use(
        store, tmp_path, monkeypatch):
    adapter = fill(store, tmp_path, TASKS)
    reads = FileReads(monkeypatch, store)
    registry = AdapterRegistry()
    report = StoreSync(store, registry, PromptCache(1 << 20), HIDDEN, LIMITS).refresh()
    assert len(report.loaded) == TASKS and report.failed == []
    assert (reads.opened, reads.paths) == ([], [])

    entry = registry.get("task-01234")
    assert isinstance(entry, StoredEntry)
    ref = entry.adapter  # what admission, chat rendering and results read, from the row
    assert (ref.kind, ref.prompt_tokens, ref.pooled_tokens, ref.host_bytes) == (
        "lamp", 10, 5, adapter.host_bytes)
    assert ref.meta == adapter.meta

    resident = ResidentAdapters(1 << 20)
    loaded = resident.resolve(entry)
    assert reads.paths == ["task-01234 v1"] and len(reads.opened) == 1
    torch.testing.assert_close(loaded.adapter.v, adapter.v)
    resident.resolve(registry.get("task-01234"))  # resident now: no second read
    assert len(reads.opened) == 1


def test_a_file_changed_after_it_was_recorded_is_refused_by_its_hash_on_first_use(store, tmp_path):
    store_adapter(store, "t", lamp(1), HIDDEN, LIMITS)
    registry = AdapterRegistry()
    StoreSync(store, registry, PromptCache(1 << 20), HIDDEN, LIMITS).refresh()
    other = save_adapter(lamp(2), tmp_path / "other.safetensors").read_bytes()
    store.path_of(store.get("t")).write_bytes(other)  # same shapes, other bytes
    with pytest.raises(UnservableTaskError, match=r"v1 cannot be read from the store: .*content hash"):
        ResidentAdapters(1 << 20).resolve(registry.get("t"))


def test_a_row_made_for_another_backbone_is_unservable_without_opening_its_file(store, monkeypatch):
    store_adapter(store, "t", lamp(1), HIDDEN, LIMITS)
    reads = FileReads(monkeypatch, store)
    sync = StoreSync(store, AdapterRegistry(), PromptCache(1 << 20), HIDDEN * 2, LIMITS)
    assert sync.refresh().failed == ["t v1"]
    assert sync.unservable["t"] == "v1: hidden size d=16 does not match the backbone's hidden size 32"
    assert (reads.opened, reads.paths) == ([], [])


def test_rows_of_schema_1_are_upgraded_and_read_their_file_once(store, tmp_path, registry_url, monkeypatch):
    """A registry written before the row recorded enough: opening it adds the columns, its old rows
    are registered by reading their file (once), rows written since from the row alone."""
    from serving.store.registry.database import RegistryDatabase
    from serving.store.registry.tables import ADDED_COLUMNS

    store_adapter(store, "old", lamp(1), HIDDEN, LIMITS)
    with store.db.engine.begin() as conn:
        for name in ADDED_COLUMNS:
            conn.exec_driver_sql(f"ALTER TABLE lamp_adapters DROP COLUMN {name}")
        conn.exec_driver_sql("UPDATE lamp_registry_state SET schema_version = 1")
    store.db.close()

    upgraded = open_store(tmp_path / "files", registry_url)
    assert upgraded.get("old").registers_from_row is False
    with upgraded.db.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT schema_version FROM lamp_registry_state").scalar() == 2
    store_adapter(upgraded, "new", lamp(2), HIDDEN, LIMITS)
    reads = FileReads(monkeypatch, upgraded)
    registry = AdapterRegistry()
    report = StoreSync(upgraded, registry, PromptCache(1 << 20), HIDDEN, LIMITS).refresh()
    assert sorted(report.loaded) == ["new v1", "old v1"]
    assert reads.paths == ["old v1"] and len(reads.opened) == 1
    assert registry.get("old").adapter.meta == registry.get("new").adapter.meta == lamp(0).meta
    RegistryDatabase(upgraded.db.url).close()  # a second open of the upgraded schema changes nothing
