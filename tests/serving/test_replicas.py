"""Two model replicas over one store, routed by task affinity (the default with two replicas): an
admin change serves on every replica at once; each task goes to its preferred replica and a hot
task's burst spills to the other, with the same greedy answers everywhere; SIGTERM leaves no process
behind (the fixture's stop checks). A restart keeping every adapter is tests/reliability/test_server_restart.py;
admin being off without LAMP_ADMIN_TOKEN is test_bundled_prompts_serve.py (a server started without one)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from lamp_runtime.adapters import save_adapter
from serving.routing.affinity import rank_replicas

from ..conftest import lamp_from_prompt, vocab_prompt
from ..server_process import ServerProcess
from .conftest import engine_alone

pytestmark = pytest.mark.slow

TOKEN = "replica-test-token"
TEXT = "My favourite colour is"
ROUNDS = 8  # requests per burst: enough that one task's burst spills from its preferred replica


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("replica-store")


@pytest.fixture(scope="module")
def two_replicas(store, tmp_path_factory):
    # A tight load bound (the defaults let a replica queue 4 before spilling), so a burst of ROUNDS
    # requests of one task spills to the other replica.
    server = ServerProcess(store=store, replicas=2, admin_token=TOKEN,
                           log_path=tmp_path_factory.mktemp("logs") / "serve.log",
                           extra_args=["--affinity-load-factor", "1.25", "--affinity-min-queue", "2"])
    with server:
        yield server


def burst(server: ServerProcess, task_id: str, rounds: int = ROUNDS) -> list[httpx.Response]:
    def one(_):
        return httpx.post(f"{server.url}/generate", timeout=120,
                          json={"task_id": task_id, "input": TEXT, "max_new_tokens": 2})

    with ThreadPoolExecutor(rounds) as pool:
        return list(pool.map(one, range(rounds)))


def until_both_replicas(server: ServerProcess, task_id: str, rounds: int = ROUNDS) -> list[httpx.Response]:
    """Bursts of concurrent requests until both replicas have answered (a task's burst spills from
    its preferred replica once that one's queue passes the load bound); every answer is kept."""
    responses = []
    for _ in range(6):
        responses += burst(server, task_id, rounds)
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
    # a 404 takes a millisecond: only a larger burst queues enough at once to spill
    responses = until_both_replicas(server, "shared", rounds=3 * ROUNDS)
    assert {r.status_code for r in responses} == {404}
    assert len({r.headers["x-lamp-replica"] for r in responses}) == 2


def test_metrics_show_both_replicas(two_replicas):
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{two_replicas.url}/metrics").text
    replicas = {s.labels["replica"] for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "lamp_backbone_bytes"}
    assert len(replicas) == 2


def metric_samples(server: ServerProcess, name: str) -> list:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics").text
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def test_each_task_goes_to_its_preferred_replica_and_a_hot_task_spills(two_replicas, backbone, tmp_path):
    server = two_replicas
    adapters = {f"aff-{i}": lamp_from_prompt(vocab_prompt(backbone, 6, seed=95 + i), rank=3, pool=1)
                for i in range(4)}
    for task_id, adapter in adapters.items():
        assert upload(server, task_id, adapter, tmp_path).status_code == 201
    replica_ids = {s.labels["replica"] for s in metric_samples(server, "lamp_backbone_bytes")}
    assert len(replica_ids) == 2
    references = dict(zip(adapters, engine_alone(backbone, adapters, [(t, TEXT) for t in adapters], 2)))

    for task_id in adapters:  # one at a time: always the task's preferred replica, by rendezvous hashing
        preferred = rank_replicas(task_id, {r: r for r in replica_ids})[0]
        for _ in range(3):
            response = httpx.post(f"{server.url}/generate", timeout=120,
                                  json={"task_id": task_id, "input": TEXT, "max_new_tokens": 2})
            assert (response.headers["x-lamp-replica"], response.json()["text"]) == (preferred, references[task_id])

    hot = burst(server, "aff-0")  # more at once than the preferred replica's load bound: some spill
    assert {r.status_code for r in hot} == {200}
    assert len({r.headers["x-lamp-replica"] for r in hot}) == 2
    assert {r.json()["text"] for r in hot} == {references["aff-0"]}  # greedy answers do not depend on routing

    time.sleep(1.0)  # the ingress pushes its metrics twice a second
    routed = {(s.labels["model_replica"], s.labels["choice"]): s.value
              for s in metric_samples(server, "lamp_routed_requests_total")}
    assert {r for r, _ in routed} == replica_ids
    assert sum(v for (_, choice), v in routed.items() if choice == "spilled") >= 1
    assert sum(v for (_, choice), v in routed.items() if choice == "preferred") >= len(adapters) * 3
    for task_id in adapters:
        assert httpx.delete(f"{server.url}/admin/adapters/{task_id}",
                            headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
