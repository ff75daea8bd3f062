"""A store written as index.json before the registry existed, opened without `--registry` (a local
folder, and S3 on a real S3-compatible server): imported into the default registry once, on first
start, then served from the registry; index.json is only ever read, and only that once."""

from __future__ import annotations

import time

import pytest
import torch

from lamp_runtime.adapters import AdapterLimits, AdapterMeta, SoftPromptAdapter
from lamp_runtime.adapters.registry import AdapterRegistry
from lamp_runtime.prompts.cache import PromptCache
from serving.store.base import StoreError
from serving.store.files import load_stored, store_adapter
from serving.store.registry import open_store
from serving.store.sync import StoreSync

from .index_json_store import write_index_store

HIDDEN = 16
LIMITS = AdapterLimits()
IMPORTED = "into the adapter registry"


def soft(rows: int, seed: int) -> SoftPromptAdapter:
    return SoftPromptAdapter(AdapterMeta(), torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(seed)))


@pytest.fixture(scope="module")
def s3_endpoint():
    from ..local_s3 import local_s3

    with local_s3() as endpoint:
        yield endpoint


@pytest.fixture(params=["folder", "s3"])
def location(request, tmp_path, monkeypatch) -> str:
    """Where the old store lies; this machine's state folder (XDG_DATA_HOME) is the test's own."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "state"))
    if request.param == "folder":
        return str(tmp_path / "store")
    import boto3

    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = f"lamp-migration-{int(time.time() * 1000) % 10**8}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/adapters"


@pytest.fixture()
def old_store(location):
    """Task a at v2 (v1 kept too), task b at v1, task gone deleted after v3; a bundled import of b."""
    adapters = {"a": [soft(4, 1), soft(4, 2)], "b": [soft(3, 3)], "gone": [soft(2, 4)] * 3}
    index = write_index_store(location, adapters, deleted=("gone",), bundled={"b": "f" * 64})
    return location, index, adapters


def index_bytes(location: str) -> bytes:
    import fsspec

    fs, root = fsspec.core.url_to_fs(location)
    fs.invalidate_cache()
    return fs.cat_file(f"{root}/index.json")


def test_the_first_start_imports_index_json_and_serves_the_same_tasks(old_store, tmp_path, caplog):
    location, index, adapters = old_store
    with caplog.at_level("INFO"):
        store = open_store(location)
    imported = [r.getMessage() for r in caplog.records if IMPORTED in r.getMessage()]
    assert len(imported) == 1 and "2 current tasks, 3 version counters (1 of deleted tasks), 1 bundled" in imported[0]
    if location.startswith("s3://"):  # the bucket holds no database: the registry is this machine's
        assert store.db.url.startswith(f"sqlite:///{tmp_path / 'state' / 'lamp-serve' / 'registries'}")
    else:
        assert store.db.url == f"sqlite:///{tmp_path / 'store' / 'registry.sqlite3'}"
    assert {a.task_id: a for a in store.list()} == index.tasks  # versions, hashes, sizes, times
    assert store.db.last_versions() == {"a": 2, "b": 1, "gone": 3}
    assert store.bundled_sha("b") == "f" * 64

    sync = StoreSync(store, AdapterRegistry(), PromptCache(1 << 20), HIDDEN, LIMITS)
    assert sorted(sync.refresh().loaded) == ["a v2", "b v1"]
    for task_id, stored in index.tasks.items():
        served = load_stored(store.path_of(stored), stored.sha256, HIDDEN, LIMITS)
        assert torch.equal(served.prompt, adapters[task_id][-1].prompt)


def test_after_the_import_writes_go_to_the_registry_and_index_json_is_untouched(old_store):
    location, index, _ = old_store
    before = index_bytes(location)
    store = open_store(location)
    assert store_adapter(store, "a", soft(4, 9), HIDDEN, LIMITS).version == 3
    assert store_adapter(store, "gone", soft(2, 9), HIDDEN, LIMITS).version == 4  # the counter survived
    assert store_adapter(store, "new", soft(2, 9), HIDDEN, LIMITS).version == 1
    assert store.delete("b").version == 1
    assert index_bytes(location) == before
    reopened = open_store(location)
    assert {a.task_id: a.version for a in reopened.list()} == {"a": 3, "gone": 4, "new": 1}


def test_a_second_start_does_not_import_again(old_store, caplog):
    location, index, _ = old_store
    first = open_store(location)
    first.delete("a")
    # An old server still running on the same folder rewrites index.json: it is not read again.
    write_index_store(location, {"late": [soft(2, 5)]})
    with caplog.at_level("INFO"):
        second = open_store(location)
    assert IMPORTED not in caplog.text
    assert [a.task_id for a in second.list()] == ["b"]
    assert second.db.imported_index() == f"{first.files.location}/index.json generation {index.generation}"


def test_a_damaged_index_json_is_reported_left_as_it_was_and_imported_once_fixed(old_store):
    import fsspec

    location, index, _ = old_store
    fs, root = fsspec.core.url_to_fs(location)
    good = index_bytes(location)
    for damaged, message in ((b"{ not json", "index.json is not valid JSON"), (b'{"format": 99}', "damaged")):
        fs.pipe_file(f"{root}/index.json", damaged)
        with pytest.raises(StoreError, match=message):  # the server does not start on half a store
            open_store(location)
        assert index_bytes(location) == damaged  # never overwritten
    fs.pipe_file(f"{root}/index.json", good)
    store = open_store(location)
    assert {a.task_id: a for a in store.list()} == index.tasks
