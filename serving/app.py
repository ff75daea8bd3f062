"""The Serve application: ingress -> model replicas, plus the metrics hub.

`build_app(args)` is the importable application builder, used by `lamp serve` and by Serve's own
tooling with serving/serve_config.yaml (`serve run serving/serve_config.yaml`, `serve deploy ...`).
`args` are the settings keys of serving/config.py.
"""

from __future__ import annotations

import ray
from ray.serve import Application

from lamp_runtime.engine.fair_queue import queue_limit

from .config import ServeSettings
from .ingress import LampIngress
from .metrics.hub import MetricsHub
from .replica import LampModel
from .routing import request_router_config
from .transport import RETRY_AFTER_S

APP_NAME = "lamp"
# Calls besides generation that a replica must always have room for (health, info, metrics).
CONTROL_HEADROOM = 8
INGRESS_MIN_CAPACITY = 1000
# The ingress holds every request in flight and the hub every replica's metrics, yet they ask for
# no CPU: without this Ray may place them on a worker, and losing that node would fail every
# request the ingress holds. The head node's resource pins them there (a worker may go).
ON_HEAD_NODE = {"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}}


def replica_cpus(settings: ServeSettings) -> float:
    """Ray CPUs reserved per model replica: the configured value, else a fair share (at most 1) so
    that `--replicas` larger than the CPU count still schedules (torch threads are set separately)."""
    if settings.replica_cpus is not None:
        return float(settings.replica_cpus)
    total = ray.cluster_resources().get("CPU", 1.0) if ray.is_initialized() else 1.0
    return round(min(1.0, total / settings.replicas), 3)


def build_app(args: dict | None = None) -> Application:
    """The application from Serve's `args` (a YAML config's, or `serve run`'s)."""
    return application(ServeSettings.from_mapping(args or {}, source="Serve application args"))


def application(settings: ServeSettings) -> Application:
    """The application for settings already read (`lamp serve`); they reach the deployments as
    they are, not as a mapping to read again."""
    # A full batch plus the engine's waiting queue, the fair queue's reserve for light tasks included.
    per_replica = settings.max_batch_size + queue_limit(settings.engine_config())
    hub = MetricsHub.options(ray_actor_options=ON_HEAD_NODE).bind()
    routing = request_router_config(settings.routing_in_force, settings.affinity_load_factor,
                                    settings.affinity_min_queue)
    model = LampModel.options(
        # Task affinity (serving/routing/): each replica's prompt caches hold its share of the tasks.
        **({"request_router_config": routing} if routing else {}),
        num_replicas=settings.replicas,
        ray_actor_options={"num_cpus": replica_cpus(settings)},
        # Enough for a full batch plus the engine's own waiting queue: the engine, not Serve,
        # decides when a replica is full (and answers 503), and all of it shares one batch.
        max_ongoing_requests=per_replica + CONTROL_HEADROOM,
        # Beyond this many requests waiting in the ingress for a free replica: 503 at once.
        max_queued_requests=settings.max_queue,
        backpressure_config={"status_code": 503, "retry_after_s": RETRY_AFTER_S},
    ).bind(settings, hub)
    # The ingress only validates and forwards: let it take far more requests than the replicas can,
    # so overload is answered by our own limits (JSON 503 + Retry-After), not by Serve's proxy.
    capacity = max(INGRESS_MIN_CAPACITY, 4 * per_replica * settings.replicas)
    ingress = LampIngress.options(
        ray_actor_options=ON_HEAD_NODE,
        max_ongoing_requests=capacity,
        max_queued_requests=capacity,
        backpressure_config={"status_code": 503, "retry_after_s": RETRY_AFTER_S},
    )
    return ingress.bind(model, hub, settings)
