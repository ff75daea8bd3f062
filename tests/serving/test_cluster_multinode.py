"""The Serve app on a multi-node Ray cluster simulated on loopback, with the adapter store on S3.

Three Ray nodes (`ray.cluster_utils.Cluster`): a head with no CPUs (ingress, metrics hub, Serve's
controller and proxy: all zero-CPU actors) and two workers with one CPU each, so the two model
replicas (one CPU each) must land on different worker nodes. The store is an `s3://` URL on a moto
S3 server on 127.0.0.1, which every node reaches like a real bucket, and its registry a PostgreSQL
database (a throwaway server started from Debian's package), as a production cluster would run.

It registers an adapter through the admin API (ingress on the head), checks that both replicas
serve it and prints the registration-to-visibility time; kills one worker node and checks that the
adapter keeps serving from the other; then adds a fresh node and checks that the replica Serve
starts there (empty process, empty cache) serves the adapter from the store alone.
"""

from __future__ import annotations

import io
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import httpx
import pytest
import torch

from lamp_runtime.adapters import AdapterMeta, SoftPromptAdapter, save_adapter
from lamp_runtime.bench.report import write_json
from lamp_runtime.bench.workload import machine_context
from serving.http.errors import REPLICA_HEADER
from serving.bench.ports import free_port

from ..local_s3 import local_s3

pytestmark = pytest.mark.slow

ADMIN_TOKEN = "cluster-test-token"
BUCKET = "lamp-cluster-test"
HIDDEN = 576  # the embedded SmolLM2-135M
REQUEST = {"task_id": "cluster_task", "input": "Hello", "max_new_tokens": 2}
READY_TIMEOUT_S = 240.0
REPORT_ENV = "LAMP_CLUSTER_REPORT"  # write the measured timings there as JSON


def adapter_bytes(seed: int) -> bytes:
    prompt = torch.randn(4, HIDDEN, generator=torch.Generator().manual_seed(seed)) * 0.01
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a.safetensors"
        save_adapter(SoftPromptAdapter(AdapterMeta(), prompt), path)
        return path.read_bytes()


def replica_nodes(deployment: str = "LampModel") -> dict[str, str]:
    """Replica id -> Ray node id of a deployment's live replicas, from the GCS actor table."""
    import ray._private.state as state

    found = {}
    for actor in state.actors().values():
        name = actor.get("Name") or ""
        if name.startswith("SERVE_REPLICA::") and f"#{deployment}#" in name and actor["State"] == "ALIVE":
            found[name.rsplit("#", 1)[-1]] = actor["Address"]["NodeID"]
    return found


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def s3_store():
    # Started before the Ray nodes: their processes inherit the AWS_* variables, as nodes with an
    # IAM role would have credentials.
    with local_s3():
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield f"s3://{BUCKET}/adapters"


@pytest.fixture(scope="module")
def registry():
    from ..local_postgres import fresh_database, local_postgres

    with local_postgres() as server:
        yield fresh_database(server, "cluster")


@pytest.fixture(scope="module")
def cluster(s3_store, registry):
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from serving.app import APP_NAME, build_app

    saved_token = os.environ.get("LAMP_ADMIN_TOKEN")
    os.environ["LAMP_ADMIN_TOKEN"] = ADMIN_TOKEN
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sim = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [sim.add_node(num_cpus=1) for _ in range(2)]
    sim.wait_for_nodes()
    port = free_port()
    try:
        ray.init(address=sim.address, logging_level="WARNING")
        # One proxy: all "nodes" share this host, so proxies on every node would fight over the port.
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        args = {"store": s3_store, "registry": registry, "prompts": "", "dtype": "float32", "quantization": "none",
                "device": "cpu",
                # task-affinity routing, as deploy/serve_config.cluster.yaml sets it, with a tight load
                # bound (the defaults let a replica queue 4 before spilling): the one task's bursts of 4
                # spill from its preferred replica, so both replicas (nodes) serve it
                "routing": "affinity", "affinity_load_factor": 1.25, "affinity_min_queue": 2,
                "replicas": 2, "replica_cpus": 1, "threads": 1, "max_batch_size": 4, "max_queue": 8,
                "max_new_tokens": 8, "prompt_cache_mb": 16}
        started = time.monotonic()
        serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"

        def healthy():
            try:
                return httpx.get(f"{url}/healthz", timeout=5).status_code == 200 and len(replica_nodes()) == 2
            except httpx.HTTPError:
                return False

        wait_for(healthy, READY_TIMEOUT_S, "the app on the cluster to become healthy")
        healthy_s = time.monotonic() - started
        print(f"\ncluster: app healthy with 2 replicas in {healthy_s:.1f} s")
        yield {"url": url, "cluster": sim, "workers": workers, "report": {"app_healthy_s": round(healthy_s, 1)}}
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            sim.shutdown()
            if saved_token is None:
                os.environ.pop("LAMP_ADMIN_TOKEN", None)
            else:
                os.environ["LAMP_ADMIN_TOKEN"] = saved_token


def generate(url: str) -> tuple[int, str | None]:
    """(status, replica id that answered)."""
    return timed_generate(url)[:2]


def timed_generate(url: str) -> tuple[int, str | None, float]:
    """(status, replica id that answered, monotonic time the request was sent)."""
    sent = time.monotonic()
    try:
        response = httpx.post(f"{url}/generate", json=REQUEST, timeout=60)
    except httpx.HTTPError:
        return 0, None, sent
    replica = response.headers.get(REPLICA_HEADER) if response.status_code == 200 else None
    return response.status_code, replica, sent


def test_register_once_serve_everywhere_survive_a_node_loss(cluster):
    url = cluster["url"]
    placement = replica_nodes()
    assert len(set(placement.values())) == 2, f"replicas share a node: {placement}"
    assert generate(url)[0] == 404  # not registered yet, on any replica

    response = httpx.put(f"{url}/admin/adapters/{REQUEST['task_id']}",
                         files={"adapter": ("a.safetensors", io.BytesIO(adapter_bytes(1)))},
                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60)
    assert response.status_code == 201, response.text
    registered = time.monotonic()

    # Both replicas (on different nodes) serve the new task. Per replica: when the first request it
    # served was sent (the adapter was visible by then, give or take the routing) and answered.
    first_served: dict[str, tuple[float, float]] = {}
    statuses = []
    with ThreadPoolExecutor(4) as pool:
        deadline = registered + 60
        while len(first_served) < 2 and time.monotonic() < deadline:
            for status, replica, sent in pool.map(lambda _: timed_generate(url), range(4)):
                statuses.append(status)
                if status == 200 and replica not in first_served:
                    first_served[replica] = (sent - registered, time.monotonic() - registered)
    assert set(first_served) == set(placement), f"served by {first_served}, replicas {placement}"
    # With the registry every request reads the change number first (serving/replica.py), so the
    # task is served on every replica as soon as the admin call has returned (docs/cluster.md): no
    # request sent after that may answer 404, or anything but 200.
    assert set(statuses) == {200}, statuses
    report = cluster["report"]
    report["registration_to_first_200_s"] = {r[:8]: {"sent": round(sent, 3), "answered": round(done, 3)}
                                              for r, (sent, done) in sorted(first_served.items())}
    report["answered_404_before_visible"] = [statuses.count(404), len(statuses)]
    print("cluster: registration-to-visibility per replica (first 200 after the admin PUT returned): "
          + ", ".join(f"{r[:8]} sent +{sent:.3f} s, answered +{done:.3f} s"
                      for r, (sent, done) in sorted(first_served.items()))
          + f"; {statuses.count(404)} of {len(statuses)} requests answered 404 before that")
    with ThreadPoolExecutor(4) as pool:
        assert [status for status, _ in pool.map(lambda _: generate(url), range(8))] == [200] * 8

    # Kill the worker node of one replica (no graceful shutdown: as if the machine died) while four
    # clients keep sending requests: the ingress re-sends a request whose replica died
    # (serving/generation.py), so no client sees a failure.
    sim = cluster["cluster"]
    # The ingress and the metrics hub are pinned to the head node (serving/app.py): losing a worker
    # fails none of the requests the ingress holds, whichever worker it is.
    front = set(replica_nodes("LampIngress").values()) | set(replica_nodes("MetricsHub").values())
    assert front == {sim.head_node.node_id}, f"the ingress and the hub run on {front}, not the head node"
    victim_replica, victim_node_id = sorted(placement.items())[0]
    survivor = next(r for r in placement if r != victim_replica)
    victim = next(n for n in cluster["workers"] if n.node_id == victim_node_id)
    stop, during = threading.Event(), []

    def client_loop():
        while not stop.is_set():
            during.append(generate(url))

    clients = [threading.Thread(target=client_loop) for _ in range(4)]
    for thread in clients:
        thread.start()
    try:
        wait_for(lambda: {replica for _, replica in during} >= {victim_replica, survivor}, 60,
                 "the load to reach both replicas")
        killed = time.monotonic()
        sim.remove_node(victim, allow_graceful=False)
        wait_for(lambda: victim_replica not in replica_nodes() and during[-8:] and
                 all(r == (200, survivor) for r in during[-8:]), 90, "the surviving replica to take all traffic")
        recovered = time.monotonic() - killed
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    failures = [status for status, _ in during if status != 200]
    print(f"cluster: node killed under 4 concurrent clients; traffic back on the survivor after {recovered:.1f} s; "
          f"{len(during)} requests during the test, {len(failures)} failed: {failures}")
    report["node_loss"] = {"clients": 4, "requests": len(during), "failed": len(failures),
                           "survivor_alone_after_s": round(recovered, 1)}
    assert failures == [], f"{len(failures)} of {len(during)} requests failed while a node was lost: {failures}"
    results = [generate(url) for _ in range(6)]
    assert results == [(200, survivor)] * 6

    # A fresh node: Serve replaces the lost replica there; it starts with nothing but the store.
    cluster["workers"].append(sim.add_node(num_cpus=1))
    replaced = time.monotonic()
    new_replica = wait_for(lambda: next((r for r in replica_nodes() if r not in placement), None), READY_TIMEOUT_S,
                           "a replacement replica on the new node")
    seen = set()

    def replacement_serves():
        with ThreadPoolExecutor(4) as pool:
            for status, replica in pool.map(lambda _: generate(url), range(4)):
                assert status == 200, f"status {status} after the new node joined"
                seen.add(replica)
        return new_replica in seen

    wait_for(replacement_serves, READY_TIMEOUT_S, "the replacement replica to serve the stored adapter")
    report["replacement_serving_after_s"] = round(time.monotonic() - replaced, 1)
    print(f"cluster: replacement replica on the new node serving the stored adapter after "
          f"{report['replacement_serving_after_s']:.1f} s")
    if os.environ.get(REPORT_ENV):  # docs/cluster.md's table: see its command there
        write_json(os.environ[REPORT_ENV], {
            "command": f"{REPORT_ENV}=docs/bench/cluster.json .venv/bin/python -m pytest -s "
                       "tests/serving/test_cluster_multinode.py",
            "machine": machine_context(), "measured": report})
