"""The status page's data: sums over replicas, windowed rates and latency quantiles, as PromQL's
`rate` and `histogram_quantile` would compute them from the same snapshots."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from serving.metrics.hub import snapshot
from serving.status import StatusBoard, Sums, quantile
from serving.store.base import StoredAdapter


def replica(saved: int, latencies: dict[str, list[float]]) -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("lamp_soft_prompt_tokens_saved_total", "saved", registry=registry).inc(saved)
    histogram = Histogram("lamp_request_seconds", "latency", ["task"], buckets=(0.1, 0.2, 0.4, 0.8),
                          registry=registry)
    for task, values in latencies.items():
        for value in values:
            histogram.labels(task).observe(value)
    return registry


def ingress(requests: dict[tuple[str, str], int]) -> CollectorRegistry:
    registry = CollectorRegistry()
    counter = Counter("lamp_requests_total", "requests", ["task", "status"], registry=registry)
    for (task, status), n in requests.items():
        counter.labels(task, status).inc(n)
    return registry


def stored(task_id: str, pool: int | None) -> StoredAdapter:
    return StoredAdapter(task_id, 1, "lamp", 100, 25, 1000, "0" * 64, 0.0, "upload", pool)


def test_quantile_interpolates_within_buckets_like_histogram_quantile():
    buckets = {0.1: 0.0, 0.2: 10.0, 0.4: 20.0, math.inf: 20.0}
    assert quantile(0.5, buckets) == pytest.approx(0.2)
    assert quantile(0.25, buckets) == pytest.approx(0.15)
    assert quantile(0.95, buckets) == pytest.approx(0.38)
    assert quantile(0.5, {0.1: 0.0, math.inf: 0.0}) is None
    assert quantile(0.99, {0.1: 1.0, math.inf: 2.0}) == 0.1  # past the last finite bound


def test_sums_add_replicas_and_split_latency_by_task():
    a = snapshot(replica(30, {"t1": [0.05, 0.15]}), {"replica": "a"})
    b = snapshot(replica(12, {"t1": [0.3], "t2": [0.7]}), {"replica": "b"})
    front = snapshot(ingress({("t1", "200"): 3, ("t2", "200"): 1, ("t2", "503"): 5}), {})
    sums = Sums.of([a, b, front], at=100.0)
    assert sums.totals["soft_prompt_tokens_saved"] == 42
    assert sums.totals["requests"] == 9  # every status
    assert sums.requests == {"t1": 3, "t2": 1}  # answered
    assert sums.buckets["latency"]["t1"][0.4] == 3 and sums.buckets["latency"]["t2"][0.4] == 0


def test_view_rates_and_quantiles_cover_the_last_window_only():
    board = StatusBoard(window_s=60, sample_every_s=5)
    old = Sums.of([snapshot(replica(0, {"t1": [0.7] * 10}), {}),
                   snapshot(ingress({("t1", "200"): 10}), {})], at=1000.0)
    board.record(old)
    now = Sums.of([snapshot(replica(600, {"t1": [0.7] * 10 + [0.15] * 30}), {}),
                   snapshot(ingress({("t1", "200"): 40}), {})], at=1060.0)
    view = board.view(now, [stored("t1", 4), stored("idle", None)])
    assert view["window_s"] == 60 and view["tasks_total"] == 2
    assert view["rates"]["requests"] == pytest.approx(30 / 60)
    assert view["rates"]["soft_prompt_tokens_saved"] == pytest.approx(10.0)
    busy, idle = view["tasks"]
    assert (busy["task_id"], busy["pool"], busy["served_tokens"], busy["requests"]) == ("t1", 4, 25, 40)
    assert busy["requests_per_s"] == pytest.approx(0.5)
    assert busy["latency_p95_ms"] < 200  # the slow requests were before the window
    assert idle["task_id"] == "idle" and idle["latency_p50_ms"] is None and idle["pool"] is None
    assert [round(p["requests"], 3) for p in view["history"]] == [0.5]


def test_requests_of_unregistered_tasks_are_shown_apart():
    board = StatusBoard()
    sums = Sums.of([snapshot(ingress({("other", "200"): 2}), {})], at=5.0)
    view = board.view(sums, [stored("t1", 1)])
    assert [row["task_id"] for row in view["other"]] == ["other"]
    assert view["rates"]["requests"] is None  # one point: no rate yet
