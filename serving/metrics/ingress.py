"""The Prometheus metrics of the ingress: requests by task and HTTP status."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from .process import ProcessCollector

OTHER_TASK = "other"


class TaskLabels:
    """Bounded `task` label values: registered tasks, first come first served up to `limit`, else "other".

    Unknown task ids (anyone can send any string) never become label values, so a client cannot
    grow the metric set without bound.
    """

    def __init__(self, limit: int = 64):
        self.limit = limit
        self._labels: set[str] = set()

    def label(self, task_id: str | None, registered: bool) -> str:
        if not task_id or not registered:
            return OTHER_TASK
        if task_id in self._labels:
            return task_id
        if len(self._labels) < self.limit:
            self._labels.add(task_id)
            return task_id
        return OTHER_TASK


class IngressMetrics:
    """What the ingress measures: requests by task and HTTP status."""

    def __init__(self, task_label_limit: int = 64):
        self.registry = CollectorRegistry()
        self.requests = Counter("lamp_requests_total", "Inference requests by task and HTTP status",
                                ["task", "status"], registry=self.registry)
        self.registry.register(ProcessCollector())
        self.task_labels = TaskLabels(task_label_limit)

    def count_request(self, task_id: str | None, registered: bool, status: int) -> None:
        self.requests.labels(self.task_labels.label(task_id, registered), str(status)).inc()
