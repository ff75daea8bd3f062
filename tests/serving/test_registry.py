"""The registry store (serving/store/registry/) against SQLite and a real PostgreSQL server: versions,
change-sequence sync, pages, concurrent writers, and the import of a store written as index.json."""

from __future__ import annotations

import threading

import pytest
import torch

from lamp_runtime.adapters import AdapterLimits, AdapterMeta, SoftPromptAdapter, load_adapter
from lamp_runtime.adapters.registry import AdapterRegistry
from lamp_runtime.errors import AdapterError, UnknownTaskError
from lamp_runtime.prompts.cache import PromptCache
from serving.store.registry import open_store
from serving.store.base import StoreError
from serving.store.files import import_bundled, store_adapter
from serving.store.registry.store import RegistryAdapterStore
from serving.store.sync import StoreSync

from .index_json_store import write_index_store

HIDDEN = 16
LIMITS = AdapterLimits()


def soft(rows: int, seed: int) -> SoftPromptAdapter:
    return SoftPromptAdapter(AdapterMeta(), torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(seed)))


def put(store, task_id: str, adapter=None):
    return store_adapter(store, task_id, adapter or soft(4, 0), HIDDEN, LIMITS)


@pytest.fixture()
def store(tmp_path, registry_url) -> RegistryAdapterStore:
    return open_store(tmp_path / "files", registry_url)


def test_versions_are_monotonic_across_delete_and_files_are_pruned(store):
    assert [put(store, "a").version for _ in range(3)] == [1, 2, 3]
    assert store.get("a").version == 3
    root = store.files.root
    assert sorted(p.name for p in (root / "a").iterdir()) == ["v2.safetensors", "v3.safetensors"]
    assert store.delete("a").version == 3
    assert store.get("a") is None and store.delete("a") is None
    assert not (root / "a").exists()
    assert put(store, "a").version == 4
    assert store.db.last_versions() == {"a": 4}
    assert not (root / "index.json").exists()  # the registry replaced it


def test_a_stored_row_describes_its_verified_file(store):
    stored = put(store, "t", soft(6, 1))
    path = store.path_of(stored)
    assert (stored.kind, stored.prompt_tokens, stored.bytes) == ("soft_prompt", 6, path.stat().st_size)
    assert store.sha256_of(path) == stored.sha256
    assert store.get("t") == stored


def test_a_failed_or_unverifiable_write_changes_nothing(store):
    first = put(store, "t")
    seq = store.change_key()

    def broken_write(path):
        path.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        store.put("t", broken_write, facts=None)
    with pytest.raises(AdapterError, match="not a safetensors file"):
        store.put("t", lambda p: p.write_bytes(b"\0" * 64), facts=None, verify=lambda p: load_adapter(p, HIDDEN))
    assert store.get("t") == first and store.change_key() == seq
    assert sorted(p.name for p in (store.files.root / "t").iterdir()) == ["v1.safetensors"]
    assert put(store, "t").version == 2  # nothing of the failed attempts was left behind


def test_reserved_names_and_invalid_ids_never_reach_the_store(store):
    for bad in ("registry.sqlite3", "registry.sqlite3-wal", "index.json"):
        with pytest.raises(AdapterError, match="reserved by the adapter store"):
            put(store, bad)
    for bad in ("../escape", "a/b", ".hidden"):
        with pytest.raises(AdapterError, match="invalid task id"):
            put(store, bad)
    assert store.page(10).total == 0


def test_pages_follow_the_cursor_with_a_total(store):
    for name in ("b", "a", "d", "c", "e"):
        put(store, name)
    store.delete("c")
    first = store.page(2)
    assert [a.task_id for a in first.adapters] == ["a", "b"] and first.total == 4 and first.has_more
    second = store.page(2, after=first.last_id)
    assert [a.task_id for a in second.adapters] == ["d", "e"] and not second.has_more
    assert store.page(2, after="e").adapters == [] and store.page(2, after="e").total == 4
    put(store, "B")  # byte order (upper case first) on both databases
    assert [a.task_id for a in store.page(10).adapters] == ["B", "a", "b", "d", "e"]


def test_changes_since_returns_only_later_changes(store):
    put(store, "a")
    put(store, "b")
    start = store.changes_since(None)
    assert start.complete and [a.task_id for a in start.current] == ["a", "b"] and start.cursor == 2
    assert store.changes_since(start.cursor).current == []
    put(store, "a")
    put(store, "a")  # two changes of one task: one row
    store.delete("b")
    later = store.changes_since(start.cursor)
    assert not later.complete and [(a.task_id, a.version) for a in later.current] == [("a", 3)]
    assert later.removed == ["b"] and later.cursor == 5 == store.change_key()


def test_concurrent_writers_from_separate_handles_never_collide(tmp_path, registry_url):
    """Each thread opens its own store (own connections, own file lock), like the ingress and replicas."""
    open_store(tmp_path / "files", registry_url)
    errors = []

    def writer(task_id):
        try:
            own = open_store(tmp_path / "files", registry_url)
            for _ in range(4):
                put(own, task_id)
                put(own, "shared")
            own.db.close()
        except Exception as exc:  # collected: an assert in a thread would be lost
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(f"t{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    store = open_store(tmp_path / "files", registry_url)
    assert store.db.last_versions() == {"t0": 4, "t1": 4, "t2": 4, "shared": 12}
    assert store.change_key() == 24 and store.get("shared").version == 12


def test_an_older_racing_version_never_replaces_a_newer_one(store):
    from dataclasses import replace

    older = put(store, "t")
    newer = put(store, "t")  # committed first, though its upload started later
    assert store.db.make_current(replace(older, created_at=newer.created_at + 1)) is False
    assert store.get("t").version == newer.version


def test_an_unreachable_registry_is_a_store_error_naming_it_without_its_password(tmp_path):
    with pytest.raises(StoreError, match=r"cannot open the adapter registry postgresql\+psycopg://u:\*\*\*@127"):
        open_store(tmp_path, "postgresql://u:secret@127.0.0.1:1/none")


# ---- a replica's sync -------------------------------------------------------------------------------


def test_a_replica_loads_everything_once_then_only_changes(store):
    for i in range(5):
        put(store, f"t{i}", soft(4, i))
    sync = StoreSync(store, AdapterRegistry(), PromptCache(1 << 20), HIDDEN, LIMITS)
    assert len(sync.refresh().loaded) == 5
    assert sync.refresh_if_changed() is None  # one read of the change number

    put(store, "t1", soft(4, 9))
    store.delete("t2")
    report = sync.refresh_if_changed()
    assert report.loaded == ["t1 v2"] and report.removed == ["t2"]
    torch.testing.assert_close(sync.registry.get("t1").adapter.load().prompt, soft(4, 9).prompt)
    with pytest.raises(UnknownTaskError):
        sync.registry.get("t2")
    assert len(sync.registry) == 4


def test_bundled_files_are_imported_once(store, tmp_path):
    from lamp_runtime.adapters import save_adapter

    prompts = tmp_path / "prompts"
    prompts.mkdir()
    save_adapter(soft(4, 1), prompts / "bundled.safetensors")
    assert [s.version for s in import_bundled(store, prompts, HIDDEN, LIMITS)] == [1]
    assert import_bundled(store, prompts, HIDDEN, LIMITS) == []
    save_adapter(soft(4, 2), prompts / "bundled.safetensors")  # retrained: a new version
    assert [s.version for s in import_bundled(store, prompts, HIDDEN, LIMITS)] == [2]
    assert store.get("bundled").source == "bundled:bundled.safetensors"


# ---- migration from index.json --------------------------------------------------------------------


def test_a_store_written_as_index_json_is_imported_on_first_start(tmp_path, registry_url):
    from lamp_runtime.adapters import save_adapter
    from serving.store.files import BundledAdapter

    folder = tmp_path / "files"
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    save_adapter(soft(4, 7), prompts / "bundled.safetensors")
    bundled_sha = BundledAdapter("bundled", prompts / "bundled.safetensors").sha256(LIMITS)
    # The store as the code before the registry left it: three versions of a, a deleted task, a bundled import.
    before = write_index_store(folder, {"a": [soft(4, 1)] * 3, "bundled": [soft(4, 7)], "gone": [soft(4, 0)]},
                               deleted=("gone",), bundled={"bundled": bundled_sha})
    (folder / "a" / "v4.safetensors").write_bytes(b"an orphan of a crash, never indexed")

    store = open_store(folder, registry_url)
    assert {a.task_id: a for a in store.list()} == before.tasks  # versions, hashes, sources, times
    assert store.db.last_versions() == {"a": 4, "bundled": 1, "gone": 1}
    assert store.bundled_sha("bundled") == before.bundled["bundled"]
    assert import_bundled(store, prompts, HIDDEN, LIMITS) == []  # the import record survived
    assert put(store, "a").version == 5 and put(store, "gone").version == 2
    sync = StoreSync(store, AdapterRegistry(), PromptCache(1 << 20), HIDDEN, LIMITS)
    assert sorted(sync.refresh().loaded) == ["a v5", "bundled v1", "gone v2"]

    again = open_store(folder, registry_url)  # a second start imports nothing again
    assert again.get("a").version == 5 and again.page(10).total == 3


def test_many_adapters_are_stored_with_one_commit_each_whole_or_not_at_all(store):
    from serving.store.files import store_adapters

    bad = SoftPromptAdapter(AdapterMeta(), torch.randn(4, HIDDEN + 1))  # fails verification
    outcomes = store_adapters(store, [("a", soft(4, 1)), ("x/y", soft(4, 2)), ("b", bad), ("a", soft(4, 3)),
                                      ("c", soft(4, 4))], HIDDEN, LIMITS)
    assert [o.version if not isinstance(o, Exception) else type(o).__name__ for o in outcomes] == \
        [1, "AdapterError", "AdapterError", 2, 1]
    assert store.change_key() == 3 and store.page(10).total == 2  # a v1 and v2, c: three changes, two tasks
    assert store.get("a").version == 2 and store.get("b") is None
    torch.testing.assert_close(load_adapter(store.path_of(store.get("a")), HIDDEN).prompt, soft(4, 3).prompt)
    assert not (store.files.root / "b").exists() or list((store.files.root / "b").iterdir()) == []


def test_servers_starting_at_once_create_the_schema_once(tmp_path, registry_url):
    """The ingress and every replica open the registry at the same moment on a fresh database."""
    from serving.store.registry import check_registry_url
    from serving.store.registry.database import RegistryDatabase

    url = check_registry_url(registry_url)
    opened, errors = [], []

    def open_one():
        try:
            opened.append(RegistryDatabase(url))
        except Exception as exc:  # collected: an assert in a thread would be lost
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(opened) == 6
    assert {db.current_seq() for db in opened} == {0}
    for db in opened:
        db.close()


# ---- per-task limits -----------------------------------------------------------------------------


def test_task_limits_are_a_change_every_replica_applies_kept_across_versions_cleared_on_delete(store):
    from lamp_runtime.engine.fair_queue import TaskLimits

    put(store, "a")
    put(store, "b")
    applied = []
    sync = StoreSync(store, AdapterRegistry(), PromptCache(1 << 20), HIDDEN, LIMITS,
                     apply_limits=lambda task_id, limits: applied.append((task_id, limits)) or True)
    sync.refresh()
    assert applied == []  # defaults are not handed to the engine, task by task
    before = store.change_key()
    assert store.set_limits("a", 2.5, 3).weight == 2.5
    assert store.change_key() == before + 1 and store.set_limits("missing", 1.0, None) is None
    assert sync.refresh_if_changed().loaded == [] and applied == [("a", TaskLimits(2.5, 3))]

    put(store, "a")  # a new version keeps the task's limits
    assert (store.get("a").version, store.get("a").weight, store.get("a").max_waiting) == (2, 2.5, 3)
    fresh = []  # a replica starting now gets them from the rows
    StoreSync(store, AdapterRegistry(), PromptCache(1 << 20), HIDDEN, LIMITS,
              apply_limits=lambda task_id, limits: fresh.append((task_id, limits)) or True).refresh()
    assert fresh == [("a", TaskLimits(2.5, 3))]

    store.delete("a")
    sync.refresh_if_changed()
    assert applied[-1] == ("a", TaskLimits())  # back to the defaults on the replica
    put(store, "a")
    assert (store.get("a").weight, store.get("a").max_waiting) == (None, None)
