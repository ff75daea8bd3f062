"""The adapter store on S3 (as `open_store` opens it: version objects in the bucket, metadata in the
registry), against a real S3-compatible server (moto's server mode) on loopback.

Nothing of fsspec or s3fs is mocked: every call below is an HTTP request to that server, with the
same conditional PUTs (If-None-Match) that AWS S3 answers.
"""

from __future__ import annotations

import threading
import time

import boto3
import pytest
import torch

from lamp_runtime.adapters import AdapterLimits, AdapterMeta, SoftPromptAdapter
from lamp_runtime.adapters.registry import AdapterRegistry
from lamp_runtime.prompts.cache import PromptCache
from serving.store.registry import open_store
from serving.store.files import load_stored, store_adapter
from serving.store.registry.store import RegistryAdapterStore
from serving.store.sync import StoreSync

from ..local_s3 import local_s3

HIDDEN = 16
LIMITS = AdapterLimits()


def soft(rows: int, seed: int) -> SoftPromptAdapter:
    return SoftPromptAdapter(AdapterMeta(), torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(seed)))


def put(store, task_id: str, adapter=None):
    return store_adapter(store, task_id, adapter or soft(4, 0), HIDDEN, LIMITS)


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1; the AWS_* variables point boto/s3fs (and child processes) at it."""
    with local_s3() as endpoint:
        yield endpoint


@pytest.fixture()
def bucket(s3_endpoint, request):
    name = f"lamp-{request.node.name.replace('_', '-')[:40].lower()}-{int(time.time() * 1000) % 100000}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture()
def registry_db(tmp_path) -> str:
    """One registry shared by every view of the bucket below, as a cluster shares its PostgreSQL."""
    return f"sqlite:///{tmp_path / 'registry.sqlite3'}"


def open_view(bucket: str, registry_db: str, cache_dir) -> RegistryAdapterStore:
    """One node's view of the store: its own connections and its own local cache of version objects."""
    store = open_store(f"s3://{bucket}/adapters", registry_db)
    store.files.objects.cache_dir = cache_dir
    return store


@pytest.fixture()
def store(bucket, registry_db, tmp_path):
    return open_view(bucket, registry_db, tmp_path / "cache")


def object_names(bucket: str, prefix: str) -> list[str]:
    listing = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def test_open_store_picks_the_backend_by_location(tmp_path, bucket, monkeypatch):
    """A local folder (path or file:// URL) gets the SQLite registry inside it; an object store
    without a registry one in this machine's state folder (one per store URL), and with one keeps
    only its files there."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "state"))
    local = open_store(tmp_path / "a")
    assert isinstance(local, RegistryAdapterStore) and (tmp_path / "a" / "registry.sqlite3").is_file()
    assert isinstance(open_store(f"file://{tmp_path}/b"), RegistryAdapterStore)
    assert open_store(f"file://{tmp_path}/b").files.root == tmp_path / "b"
    default = open_store(f"s3://{bucket}/x")
    registries = tmp_path / "state" / "lamp-serve" / "registries"
    assert isinstance(default, RegistryAdapterStore) and default.db.url.startswith(f"sqlite:///{registries}/s3-")
    assert open_store(f"s3://{bucket}/x/").db.url == default.db.url != open_store(f"s3://{bucket}/z").db.url
    with_registry = open_store(f"s3://{bucket}/y", f"sqlite:///{tmp_path}/y.sqlite3")
    assert isinstance(with_registry, RegistryAdapterStore)
    assert object_names(bucket, "") == []  # no database, and no index.json, in the bucket


def test_round_trip_and_immutable_versions(store, bucket):
    adapter = soft(6, 1)
    first = put(store, "t", adapter)
    assert (first.task_id, first.version, first.kind, first.prompt_tokens) == ("t", 1, "soft_prompt", 6)
    loaded = load_stored(store.path_of(first), first.sha256, HIDDEN, LIMITS)
    assert torch.equal(loaded.prompt, adapter.prompt)
    v1_bytes = boto3.client("s3").get_object(Bucket=bucket, Key="adapters/t/v1.safetensors")["Body"].read()

    assert [put(store, "t", soft(6, s)).version for s in (2, 3)] == [2, 3]
    assert store.get("t").version == 3
    # The current version and the one before it stay; a replica that read the older row can still load v2.
    assert object_names(bucket, "adapters/") == ["adapters/t/v2.safetensors", "adapters/t/v3.safetensors"]
    assert v1_bytes != boto3.client("s3").get_object(Bucket=bucket, Key="adapters/t/v2.safetensors")["Body"].read()

    assert store.delete("t").version == 3 and store.get("t") is None and store.delete("t") is None
    assert object_names(bucket, "adapters/") == []
    assert put(store, "t").version == 4  # numbers are never reused after a delete


def test_a_version_written_by_a_crashed_writer_keeps_its_number(store, bucket):
    put(store, "t")
    # An object no row names (its writer died between the PUT and the registry's commit).
    boto3.client("s3").put_object(Bucket=bucket, Key="adapters/t/v2.safetensors", Body=b"orphan")
    assert store.get("t").version == 1
    assert put(store, "t").version == 3


def test_a_failed_verification_leaves_the_store_alone(store, bucket):
    first = put(store, "t")
    before = store.change_key()

    def refuse(path):
        raise ValueError("not what was meant")

    with pytest.raises(ValueError):
        store.put("t", lambda p: p.write_bytes(b"x"), facts=None, verify=refuse)
    assert store.change_key() == before and store.get("t") == first
    assert object_names(bucket, "adapters/t/") == ["adapters/t/v1.safetensors"]


def test_concurrent_writers_with_their_own_views_lose_nothing(bucket, registry_db, tmp_path):
    """Writers with their own store objects (as on different nodes) race on version numbers: the
    conditional PUT makes every registration land, each under its own version number."""
    writers, per_writer, errors, results = 4, 3, [], []

    def work(w: int):
        own = open_view(bucket, registry_db, tmp_path / f"c{w}")
        try:
            for i in range(per_writer):
                results.append(put(own, f"task{i % 2}", soft(3, w * 10 + i)))
                results.append(put(own, f"w{w}", soft(3, i)))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    check = open_view(bucket, registry_db, tmp_path / "check")
    assert check.change_key() == writers * per_writer * 2
    for task, count in (("task0", 2 * writers), ("task1", writers)):
        versions = [r.version for r in results if r.task_id == task]
        assert sorted(versions) == list(range(1, count + 1))  # no version number handed out twice
        assert check.get(task).version == count  # the highest version is current
    assert check.db.last_versions()["task0"] == max(r.version for r in results if r.task_id == "task0")
    assert {f"w{w}" for w in range(writers)} <= {a.task_id for a in check.list()}
    assert all(check.get(f"w{w}").version == per_writer for w in range(writers))


def test_replica_sync_follows_the_registry_and_downloads_from_the_bucket(store, bucket, registry_db, tmp_path):
    """The replica side: StoreSync over a second store object (another node's view of the bucket)."""
    put(store, "a", soft(4, 1))
    replica_view = open_view(bucket, registry_db, tmp_path / "replica")
    registry = AdapterRegistry()
    sync = StoreSync(replica_view, registry, PromptCache(1 << 20), HIDDEN, LIMITS)
    assert sync.refresh().loaded == ["a v1"]
    assert not sync.changed()

    put(store, "a", soft(4, 2))
    put(store, "b", soft(2, 3))
    # A registration is committed before `put` returns: the replica's very next check sees both.
    report = sync.refresh_if_changed()
    assert report is not None, "new versions not seen at the first check after they were stored"
    assert sorted(report.loaded) == ["a v2", "b v1"]
    assert registry.get("a").version == 2 and registry.get("b").version == 1
    torch.testing.assert_close(registry.get("a").adapter.load().prompt, soft(4, 2).prompt)  # from the bucket

    store.delete("b")
    assert sync.refresh_if_changed().removed == ["b"]
    # A restarted replica (empty registry, empty local cache) is restored from the registry and the bucket.
    fresh = AdapterRegistry()
    restarted = StoreSync(open_view(bucket, registry_db, tmp_path / "new"), fresh, PromptCache(1 << 20), HIDDEN, LIMITS)
    assert restarted.refresh().loaded == ["a v2"]
    torch.testing.assert_close(fresh.get("a").adapter.load().prompt, soft(4, 2).prompt)


def test_a_store_url_reaches_the_replicas_as_written(tmp_path, monkeypatch):
    from serving.cli import build_parser
    from serving.serve_command import settings_from_args

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["serve", "--store", "s3://bucket/some/prefix", "--prompts", ""])
    settings = settings_from_args(args)  # a relative path would be resolved here; a URL is not a path
    assert settings.store == settings.store_location == "s3://bucket/some/prefix"
    local = settings_from_args(build_parser().parse_args(["serve", "--store", "st", "--prompts", ""]))
    assert local.store_location == str(tmp_path / "st")


def test_other_fsspec_backends_use_the_same_layout_with_plain_writes(tmp_path, caplog, monkeypatch):
    """A backend without conditional PUTs (fsspec's in-memory one): same objects, same answers, and
    the default registry in this machine's state folder."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "state"))
    with caplog.at_level("WARNING"):
        store = open_store(f"memory://lamp-{tmp_path.name}/adapters")
    objects = store.files.objects
    assert isinstance(store, RegistryAdapterStore) and not objects.conditional
    assert "one admin writer at a time" in caplog.text and "on this machine only" in caplog.text
    assert [put(store, "t", soft(3, s)).version for s in range(3)] == [1, 2, 3]
    assert sorted(p.rsplit("/", 1)[-1] for p in objects.fs.find(objects.root)) == ["v2.safetensors",
                                                                                  "v3.safetensors"]
    registry = AdapterRegistry()
    sync = StoreSync(store, registry, PromptCache(1 << 20), HIDDEN, LIMITS)
    assert sync.refresh().loaded == ["t v3"]
    put(store, "t", soft(3, 9))
    assert sync.refresh_if_changed().loaded == ["t v4"]
    assert store.delete("t").version == 4 and store.list() == []
