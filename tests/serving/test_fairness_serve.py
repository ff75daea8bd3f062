"""Fair service between tasks through HTTP: a task flooding a small queue gets 429 + Retry-After
for what is beyond its share, while a light task's requests are all answered (the real server, the
embedded backbone, real HTTP clients)."""

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


def test_flooding_task_gets_429_while_a_light_task_is_answered(tmp_path, prompts_dir):
    extra = ["--max-batch-size", "1", "--max-queue", "4", "--batch-wait-ms", "0", "--threads", "1",
             "--max-new-tokens", "64"]
    with ServerProcess(store=tmp_path / "store", prompts=prompts_dir, extra_args=extra,
                       log_path=tmp_path / "serve.log") as server:
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
    refused = {row["task_id"]: row["refused"] for row in status["queue"]}
    assert refused.get("plain", {}).get("task_share", 0) >= 1, status["queue"]
