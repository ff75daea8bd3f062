"""Two model replicas over one store: an admin change serves on every replica at once; a restart
keeps the adapters; SIGTERM leaves no process behind; without LAMP_ADMIN_TOKEN admin is off."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from lamp_runtime.adapters import save_adapter

from ..conftest import lamp_from_prompt, vocab_prompt
from ..server_process import ServerProcess

pytestmark = pytest.mark.slow

TOKEN = "replica-test-token"
TEXT = "My favourite colour is"
ROUNDS = 8  # requests per burst: enough that both replicas take some (Serve balances by queue length)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("replica-store")


@pytest.fixture(scope="module")
def two_replicas(store, tmp_path_factory):
    server = ServerProcess(store=store, replicas=2, admin_token=TOKEN,
                           log_path=tmp_path_factory.mktemp("logs") / "serve.log")
    with server:
        yield server


def burst(server: ServerProcess, task_id: str) -> list[httpx.Response]:
    def one(_):
        return httpx.post(f"{server.url}/generate", timeout=120,
                          json={"task_id": task_id, "input": TEXT, "max_new_tokens": 2})

    with ThreadPoolExecutor(ROUNDS) as pool:
        return list(pool.map(one, range(ROUNDS)))


def until_both_replicas(server: ServerProcess, task_id: str) -> list[httpx.Response]:
    """Bursts of concurrent requests until both replicas have answered; every answer is kept."""
    responses = []
    for _ in range(6):
        responses += burst(server, task_id)
        if len({r.headers.get("x-lamp-replica") for r in responses}) >= 2:
            break
    return responses


def upload(server: ServerProcess, task_id: str, adapter, tmp_path) -> httpx.Response:
    data = save_adapter(adapter, tmp_path / f"{task_id}.safetensors").read_bytes()
    return httpx.put(f"{server.url}/admin/adapters/{task_id}", files={"adapter": ("a.safetensors", data)},
                     headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)


def test_admin_changes_serve_on_every_replica_as_soon_as_the_call_returns(two_replicas, backbone, tmp_path):
    server = two_replicas
    first = lamp_from_prompt(vocab_prompt(backbone, 8, seed=91), rank=4, pool=2)
    assert upload(server, "shared", first, tmp_path).json()["version"] == 1
    # Every request after the 201 is served with v1, whichever replica takes it: no 404 window.
    responses = until_both_replicas(server, "shared")
    assert {r.status_code for r in responses} == {200}
    assert {r.json()["adapter_version"] for r in responses} == {1}
    assert len({r.headers["x-lamp-replica"] for r in responses}) == 2
    assert len({r.json()["text"] for r in responses}) == 1  # same adapter, same greedy text everywhere

    second = lamp_from_prompt(vocab_prompt(backbone, 8, seed=92), rank=4, pool=2)
    assert upload(server, "shared", second, tmp_path).json()["version"] == 2
    responses = until_both_replicas(server, "shared")
    assert {r.json()["adapter_version"] for r in responses} == {2}
    assert len({r.headers["x-lamp-replica"] for r in responses}) == 2

    deleted = httpx.delete(f"{server.url}/admin/adapters/shared", headers={"Authorization": f"Bearer {TOKEN}"})
    assert deleted.status_code == 200
    responses = until_both_replicas(server, "shared")
    assert {r.status_code for r in responses} == {404}
    assert len({r.headers["x-lamp-replica"] for r in responses}) == 2


def test_metrics_show_both_replicas(two_replicas):
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{two_replicas.url}/metrics").text
    replicas = {s.labels["replica"] for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "lamp_backbone_bytes"}
    assert len(replicas) == 2


def test_restart_keeps_adapters_and_admin_is_off_without_a_token(two_replicas, store, backbone, tmp_path,
                                                                  tmp_path_factory):
    adapter = lamp_from_prompt(vocab_prompt(backbone, 6, seed=93), rank=3, pool=1)
    stored = upload(two_replicas, "keeper", adapter, tmp_path).json()
    before = httpx.post(f"{two_replicas.url}/generate", timeout=120,
                        json={"task_id": "keeper", "input": TEXT, "max_new_tokens": 6}).json()
    two_replicas.stop()  # SIGTERM; raises if any Ray process outlives the server

    restarted = ServerProcess(store=store, replicas=1, admin_token=None,
                              log_path=tmp_path_factory.mktemp("logs") / "restart.log")
    with restarted:
        assert [m["id"] for m in httpx.get(f"{restarted.url}/v1/models").json()["data"]] == ["keeper"]
        after = httpx.post(f"{restarted.url}/generate", timeout=120,
                           json={"task_id": "keeper", "input": TEXT, "max_new_tokens": 6}).json()
        assert (after["adapter_version"], after["text"]) == (stored["version"], before["text"])

        refused = httpx.get(f"{restarted.url}/admin/adapters", headers={"Authorization": f"Bearer {TOKEN}"})
        assert refused.status_code == 403
        assert "set LAMP_ADMIN_TOKEN" in refused.json()["error"]["message"]
        assert httpx.delete(f"{restarted.url}/admin/adapters/keeper").status_code == 403
