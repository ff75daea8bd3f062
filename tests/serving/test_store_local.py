"""The persistent adapter store of a local folder (as `open_store` opens it: a registry inside the
folder) and the replica-side sync: atomic, versioned, never half-written."""

from __future__ import annotations

import json

import pytest
import torch

from lamp_runtime.adapters import AdapterLimits, AdapterMeta, SoftPromptAdapter
from lamp_runtime.adapters.registry import AdapterRegistry
from lamp_runtime.errors import AdapterError, UnknownTaskError
from lamp_runtime.prompts.cache import PromptCache
from serving.store.files import store_adapter
from serving.store.base import AdapterStore, RESERVED_NAMES
from serving.store.registry import open_store
from serving.store.sync import StoreSync

from .index_json_store import write_index_store

HIDDEN = 16
LIMITS = AdapterLimits()


def soft(rows: int, seed: int) -> SoftPromptAdapter:
    return SoftPromptAdapter(AdapterMeta(), torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(seed)))


def put(store: AdapterStore, task_id: str, adapter=None):
    return store_adapter(store, task_id, adapter or soft(4, 0), HIDDEN, LIMITS)


@pytest.fixture()
def store(tmp_path):
    return open_store(tmp_path / "store")


def test_versions_are_monotonic_across_delete_and_files_are_pruned(store):
    assert [put(store, "a").version for _ in range(3)] == [1, 2, 3]
    assert store.get("a").version == 3
    assert sorted(p.name for p in (store.files.root / "a").iterdir()) == ["v2.safetensors", "v3.safetensors"]
    assert store.delete("a").version == 3
    assert store.get("a") is None and store.delete("a") is None
    assert not (store.files.root / "a").exists()
    assert put(store, "a").version == 4 and store.get("a").version == 4


def test_stored_entry_describes_the_file(store):
    stored = put(store, "t", soft(6, 1))
    assert (stored.task_id, stored.kind, stored.prompt_tokens, stored.pooled_tokens) == ("t", "soft_prompt", 6, 6)
    path = store.path_of(stored)
    assert path.stat().st_size == stored.bytes
    assert [a.task_id for a in store.list()] == ["t"]


def test_the_pool_is_recorded_and_an_older_index_reads_it_as_unknown(store, tmp_path):
    pooled = SoftPromptAdapter(AdapterMeta(pool=3), torch.randn(7, HIDDEN))
    stored = put(store, "p3", pooled)
    assert (stored.pool, stored.pooled_tokens) == (3, 3)
    old = tmp_path / "old"
    write_index_store(old, {"p3": [pooled]})
    index = json.loads((old / "index.json").read_text())
    del index["tasks"]["p3"]["pool"]  # as the release before this field wrote it
    (old / "index.json").write_text(json.dumps(index))
    imported = open_store(old).get("p3")
    assert imported.pool is None and imported.pooled_tokens == 3


def test_a_failed_write_changes_nothing(store):
    first = put(store, "t")
    seq_before = store.change_key()

    def broken_write(path):
        path.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        store.put("t", broken_write, facts=None)
    assert store.change_key() == seq_before
    assert store.get("t") == first
    assert sorted(p.name for p in (store.files.root / "t").iterdir()) == ["v1.safetensors"]  # no temp file left


def test_a_file_that_fails_verification_is_never_made_current(store):
    put(store, "t")

    def corrupt_write(path):
        path.write_bytes(b"\x00" * 64)

    with pytest.raises(AdapterError, match="not a safetensors file"):
        store.put("t", corrupt_write, facts=None, verify=lambda p: store_verify(p))
    assert store.get("t").version == 1


def store_verify(path):
    from lamp_runtime.adapters import load_adapter

    load_adapter(path, HIDDEN, LIMITS)


def test_an_orphan_file_from_a_crash_reserves_its_version(store):
    put(store, "t")
    (store.files.root / "t" / "v2.safetensors").write_bytes(b"written before a crash, never indexed")
    assert put(store, "t").version == 3


def test_invalid_task_ids_never_reach_the_filesystem(store):
    for bad in ("../escape", "a/b", "", ".hidden"):
        with pytest.raises(AdapterError, match="invalid task id"):
            put(store, bad)
    assert [p.name for p in store.files.root.iterdir() if p.name not in RESERVED_NAMES] == []
    assert store.list() == []


def test_change_key_moves_on_every_write(store):
    before = store.change_key()
    put(store, "a")
    first = store.change_key()
    assert first != before
    put(store, "a")
    assert store.change_key() != first


# ---- StoreSync: a replica's registry follows the store ---------------------------------------------


@pytest.fixture()
def sync(store):
    registry = AdapterRegistry()
    cache = PromptCache(1 << 20)
    return StoreSync(store, registry, cache, HIDDEN, LIMITS)


def test_sync_loads_replaces_and_removes(store, sync):
    put(store, "a", soft(4, 1))
    put(store, "b", soft(5, 2))
    report = sync.refresh()
    assert sorted(report.loaded) == ["a v1", "b v1"]
    entry_a = sync.registry.get("a")
    sync.built.acquire(entry_a.cache_key, entry_a.adapter.load().build_prompt)
    sync.built.release(entry_a.cache_key)
    assert sync.refresh_if_changed() is None  # nothing changed: only a stat

    put(store, "a", soft(4, 9))
    store.delete("b")
    report = sync.refresh_if_changed()
    assert report.loaded == ["a v2"] and report.removed == ["b"]
    assert sync.registry.get("a").version == 2
    assert entry_a.cache_key not in sync.built  # the old version's prompt is dropped
    with pytest.raises(UnknownTaskError):
        sync.registry.get("b")
    torch.testing.assert_close(sync.registry.get("a").adapter.load().prompt, soft(4, 9).prompt)


def test_sync_keeps_the_previous_version_when_a_file_is_bad(store, sync, caplog):
    put(store, "a", soft(4, 1))
    sync.refresh()
    stored = put(store, "a", soft(4, 2))
    store.path_of(stored).write_bytes(store.path_of(stored).read_bytes()[:-4] + b"\x00\x00\x00\x01")
    report = sync.refresh()
    assert report.failed == ["a v2"]
    assert sync.registry.get("a").version == 1
    assert "does not match the store's record" in caplog.text
    assert sync.refresh().failed == []  # not retried (and not logged) again until the store changes


def test_a_task_made_for_another_backbone_is_reported_with_its_reason(store):
    """A store shared with a wider backbone: the replica says why it cannot serve the task (409),
    instead of calling a task that /v1/models lists "unknown"."""
    from lamp_runtime.errors import UnservableTaskError
    from serving.transport import refusal_for

    wide = SoftPromptAdapter(AdapterMeta(), torch.randn(4, 2 * HIDDEN))
    store_adapter(store, "wide", wide, 2 * HIDDEN, LIMITS)
    narrow_sync = StoreSync(store, AdapterRegistry(), PromptCache(1 << 20), HIDDEN, LIMITS)
    assert narrow_sync.refresh().failed == ["wide v1"]
    reason = narrow_sync.unservable["wide"]
    assert f"hidden size d={2 * HIDDEN}" in reason and f"hidden size {HIDDEN}" in reason
    refusal = refusal_for(UnservableTaskError("wide", reason))
    assert refusal.status == 409 and "'wide' is in the adapter store but this server cannot serve it" in refusal.message

    put(store, "wide", soft(4, 3))  # a fitting version replaces it
    assert narrow_sync.refresh().loaded == ["wide v2"] and "wide" not in narrow_sync.unservable
    store_adapter(store, "wide", wide, 2 * HIDDEN, LIMITS)  # a bad v3: v2 keeps serving, so not "unservable"
    assert narrow_sync.refresh().failed == ["wide v3"] and "wide" not in narrow_sync.unservable
    store_adapter(store, "other", wide, 2 * HIDDEN, LIMITS)
    narrow_sync.refresh()
    store.delete("other")
    narrow_sync.refresh()
    assert "other" not in narrow_sync.unservable


def test_sync_warns_when_an_adapter_was_trained_on_other_numerics(store, caplog):
    from lamp_runtime.backbone.options import BackboneOptions

    trained = SoftPromptAdapter(AdapterMeta(extra={"trained_on": "float32/none"}), torch.randn(4, HIDDEN))
    put(store, "fp32-tuned", trained)
    put(store, "unknown-origin", soft(4, 1))
    serving = BackboneOptions(dtype="bfloat16", quantization="nf4")
    StoreSync(store, AdapterRegistry(), PromptCache(1 << 20), HIDDEN, LIMITS, serving).refresh()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith("adapter fp32-tuned v1: trained on a float32/none backbone "
                                                        "but served on bfloat16/nf4")
    assert "--dtype bfloat16 --quantization nf4" in warnings[0]


def test_sync_survives_a_damaged_registry(store, sync, caplog):
    import sqlite3

    put(store, "a")
    sync.refresh()
    put(store, "a", soft(4, 5))  # a change the replica has not applied yet...
    with sqlite3.connect(store.files.root / "registry.sqlite3") as conn:
        conn.execute("ALTER TABLE lamp_adapters RENAME TO lamp_adapters_damaged")  # ...and its rows are gone
    assert sync.refresh().loaded == []
    assert sync.registry.get("a").version == 1  # what it had keeps serving
    assert "adapter registry" in caplog.text and "failed" in caplog.text
