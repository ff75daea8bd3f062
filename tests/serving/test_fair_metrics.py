"""Per-task queue metrics (from EngineStats.tasks, a real FairQueue's counts) and the status page's
"who waits, who is refused" rows; the refusals' HTTP mapping (429 / 503 + Retry-After)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from lamp_runtime.engine.base import EngineStats
from lamp_runtime.engine.fair_queue import FairQueue
from lamp_runtime.errors import QueueFullError, TaskQueueFullError
from lamp_runtime.prompts.cache import CacheStats
from serving.generation import refused
from serving.metrics.hub import snapshot
from serving.metrics.labels import TaskLabels
from serving.metrics.replica import EngineCollector
from serving.status import StatusBoard, Sums
from serving.transport import refusal_for


class QueueEngine:
    """The part of the engine contract the collector reads: stats() and the registry."""

    def __init__(self, queue: FairQueue, registered: set[str]):
        self.queue = queue
        self.registry = registered

    def stats(self) -> EngineStats:
        return EngineStats(kind="hf", waiting=len(self.queue), running=0, prompt_cache=CacheStats(),
                           adapter_cache=CacheStats(), backbone_bytes=0, device="cpu", tasks=self.queue.stats())


def flooded_queue() -> FairQueue:
    queue = FairQueue(capacity=4)
    for i in range(4):
        queue.push("heavy", i)
    for _ in range(3):
        with pytest.raises(TaskQueueFullError):
            queue.push("heavy", "more")
    queue.push("light", "l0")
    queue.pop_fitting(1, lambda item: 7)
    queue.charge("heavy", generated=5)
    queue.push("stranger", "s0")  # not registered: counted under "other"
    return queue


def collect(queue: FairQueue, labels: int = 64) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(EngineCollector(QueueEngine(queue, {"heavy", "light"}), lambda: 2, TaskLabels(labels)))
    return registry


def test_per_task_metrics_from_engine_stats():
    registry = collect(flooded_queue())
    value = registry.get_sample_value
    assert value("lamp_task_requests_waiting", {"task": "heavy"}) == 3
    assert value("lamp_task_requests_waiting", {"task": "light"}) == 1
    assert value("lamp_task_requests_waiting", {"task": "other"}) == 1
    assert value("lamp_task_requests_admitted_total", {"task": "heavy"}) == 1
    assert value("lamp_task_requests_refused_total", {"task": "heavy", "reason": "task_share"}) == 3
    assert value("lamp_task_tokens_served_total", {"task": "heavy", "kind": "prompt"}) == 7
    assert value("lamp_task_tokens_served_total", {"task": "heavy", "kind": "generated"}) == 5


def test_status_page_lists_who_waits_and_who_is_refused():
    board = StatusBoard(window_s=60, sample_every_s=5)
    empty = Sums.of([snapshot(collect(FairQueue(capacity=4)), {"replica": "a"})], at=0.0)
    board.view(empty, [])
    now = Sums.of([snapshot(collect(flooded_queue()), {"replica": "a"})], at=70.0)
    rows = {row["task_id"]: row for row in board.view(now, [])["queue"]}
    assert rows["heavy"]["waiting"] == 3 and rows["heavy"]["refused_recently"] == {"task_share": 3}
    assert rows["light"]["waiting"] == 1 and rows["light"]["refused"] == {}
    assert list(rows)[0] == "heavy"  # the longest queue first


def test_refusals_map_to_429_and_503_with_retry_after():
    share = refusal_for(TaskQueueFullError("heavy", "task 'heavy' holds 4 of 4"))
    full = refusal_for(QueueFullError("5 requests already waiting"))
    assert (share.status, full.status) == (429, 503)
    assert "this task" in share.message
    for refusal in (share, full):
        assert refused(refusal).headers["Retry-After"] == "1"


def test_paused_rows_by_task():
    queue = FairQueue(capacity=4, preempt=True)
    queue.push("light", "l0")
    victims, taken = queue.admit(["heavy", "heavy"], room=0)
    assert victims == [1] and taken == ["l0"]
    queue.requeue("heavy", "paused row")
    value = collect(queue).get_sample_value
    assert value("lamp_task_rows_paused_total", {"task": "heavy"}) == 1
    assert value("lamp_task_rows_paused_total", {"task": "light"}) == 0
    assert value("lamp_task_requests_waiting", {"task": "heavy"}) == 0  # a paused row is not a newcomer
