"""The Prometheus metrics of the ingress: requests by task and HTTP status."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from .labels import TaskLabels
from .process import ProcessCollector


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
