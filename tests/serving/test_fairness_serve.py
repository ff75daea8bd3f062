"""Fair service between tasks through HTTP: a task flooding a small queue gets 429 + Retry-After
for what is beyond its share, while a light task's requests are all answered, each entering the
batch by pausing a row of the flood (fair rows); a task's own limits set through the admin API
(the real server, shared by this module's tests, the embedded backbone, real HTTP clients)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from ..server_process import ServerProcess

pytestmark = pytest.mark.slow

FLOOD_CLIENTS = 12
TOKEN = "fair-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory, prompts_dir):
    extra = ["--max-batch-size", "2", "--max-queue", "4", "--batch-wait-ms", "0", "--threads", "1",
             "--max-new-tokens", "64"]
    folder = tmp_path_factory.mktemp("fair")
    with ServerProcess(store=folder / "store", prompts=prompts_dir, extra_args=extra, admin_token=TOKEN,
                       log_path=folder / "serve.log") as server:
        yield server


def test_flooding_task_gets_429_while_a_light_task_is_answered(server):
    stop = threading.Event()
    heavy: Counter = Counter()
    missing_retry_after = []
    lock = threading.Lock()

    def flood(index: int) -> None:
        with httpx.Client(timeout=300) as client:
            while not stop.is_set():
                response = client.post(f"{server.url}/generate", json={
                    "task_id": "plain", "input": f"Tell me a long story number {index}", "max_new_tokens": 48})
                with lock:
                    heavy[response.status_code] += 1
                    if response.status_code in (429, 503) and "retry-after" not in response.headers:
                        missing_retry_after.append(response.status_code)
                if response.status_code != 200:
                    stop.wait(0.2)

    with ThreadPoolExecutor(FLOOD_CLIENTS) as pool:
        futures = [pool.submit(flood, i) for i in range(FLOOD_CLIENTS)]
        try:
            deadline = time.monotonic() + 120
            while not heavy[429] and time.monotonic() < deadline:  # the queue is full of the flood
                time.sleep(0.2)
            light = []
            with httpx.Client(timeout=300) as client:
                for i in range(3):
                    response = client.post(f"{server.url}/generate", json={
                        "task_id": "lamp2", "input": f"Hello {i}", "max_new_tokens": 4})
                    light.append((response.status_code, response.text[:200]))
            metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
            status = httpx.get(f"{server.url}/status.json", timeout=30).json()
        finally:
            stop.set()
            for future in futures:
                future.result()
    assert [code for code, _ in light] == [200, 200, 200], light
    assert heavy[429] >= 1 and heavy[200] >= 1, heavy
    assert set(heavy) <= {200, 429, 503}, heavy
    assert not missing_retry_after
    assert 'lamp_task_requests_refused_total{' in metrics and 'reason="task_share"' in metrics
    # the flood held both rows when a light request came: one of its rows waited (and resumed)
    paused = [line for line in metrics.splitlines()
              if line.startswith("lamp_task_rows_paused_total{") and 'task="plain"' in line]
    assert paused and float(paused[0].split()[-1]) >= 1, [line for line in metrics.splitlines() if "paused" in line]
    refused = {row["task_id"]: row["refused"] for row in status["queue"]}
    assert refused.get("plain", {}).get("task_share", 0) >= 1, status["queue"]


def test_a_task_limit_set_through_the_admin_api_refuses_beyond_it(server):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    url = f"{server.url}/admin/tasks/lamp2/limits"
    bad = [({"weight": 0}, "weight must be a number in (0, 1000], got 0"),
           ({"max_waiting": -1}, "max_waiting must be an integer in 1..100000, got -1"),
           ({"max_waiting": "2"}, "got '2'"), ({"share": 2}, "got ['share']"), ([1], "got list")]
    for body, message in bad:
        response = httpx.put(url, json=body, headers=headers, timeout=30)
        assert response.status_code == 422 and message in response.json()["error"]["message"], response.text
    assert httpx.put(url, json={"weight": 2}, timeout=30).status_code == 401
    assert httpx.put(f"{server.url}/admin/tasks/nope/limits", json={}, headers=headers, timeout=30).status_code == 404

    set_to = httpx.put(url, json={"weight": 2.5, "max_waiting": 1}, headers=headers, timeout=30)
    assert set_to.status_code == 200, set_to.text
    assert set_to.json() == {"task_id": "lamp2", "weight": 2.5, "max_waiting": 1}
    assert httpx.get(url, headers=headers, timeout=30).json() == set_to.json()
    record = httpx.get(f"{server.url}/admin/adapters/lamp2", headers=headers, timeout=30).json()
    assert (record["weight"], record["max_waiting"]) == (2.5, 1)
    try:
        # batch size 2: two requests run, one waits (its limit), the rest are refused at once
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda i: httpx.post(f"{server.url}/generate", timeout=300, json={
                "task_id": "lamp2", "input": f"Count to {i}", "max_new_tokens": 32}), range(6)))
        refused = [r for r in responses if r.status_code == 429]
        assert refused and {r.status_code for r in responses} <= {200, 429}, [r.text[:120] for r in responses]
        assert all("max_waiting=1" in r.json()["error"]["message"] and "retry-after" in r.headers for r in refused)
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
        assert 'reason="task_limit"' in metrics
    finally:
        reset = httpx.put(url, json={}, headers=headers, timeout=30)
    assert reset.json() == {"task_id": "lamp2", "weight": 1.0, "max_waiting": None}
