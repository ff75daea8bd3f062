"""The Prometheus metrics of the ingress: requests by task and HTTP status, and where the
task-affinity router sent them (the router runs in this process: serving/routing/stats.py)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.metrics_core import CounterMetricFamily

from ..routing.stats import ROUTED, RoutingCounts
from .labels import TaskLabels
from .process import ProcessCollector


class RoutingCollector:
    """`lamp_routed_requests_total{model_replica, choice}`: requests the task-affinity router sent
    to each model replica, to the task's preferred replica or spilled there because the preferred
    one was busy. `model_replica` is the `replica` label of that replica's own metrics (the hub
    sets `replica` to this ingress)."""

    def __init__(self, counts: RoutingCounts = ROUTED):
        self.counts = counts

    def collect(self):
        family = CounterMetricFamily("lamp_routed_requests",
                                     "Requests routed to a model replica by task affinity: to the task's "
                                     "preferred replica, or spilled to the next in its order (preferred busy)",
                                     labels=["model_replica", "choice"])
        for (replica, choice), value in sorted(self.counts.snapshot().items()):
            family.add_metric([replica, choice], value)
        yield family


class IngressMetrics:
    """What the ingress measures: requests by task and HTTP status, and affinity routing."""

    def __init__(self, task_label_limit: int = 64, routing_counts: RoutingCounts = ROUTED):
        self.registry = CollectorRegistry()
        self.requests = Counter("lamp_requests_total", "Inference requests by task and HTTP status",
                                ["task", "status"], registry=self.registry)
        self.registry.register(ProcessCollector())
        self.registry.register(RoutingCollector(routing_counts))
        self.task_labels = TaskLabels(task_label_limit)

    def count_request(self, task_id: str | None, registered: bool, status: int) -> None:
        self.requests.labels(self.task_labels.label(task_id, registered), str(status)).inc()
