"""Metrics of all replicas at one `/metrics`: every replica pushes its registry to a hub deployment.

Why a hub and not prometheus_client's multiprocess mode: multiprocess mode shares mmap files in one
directory, so it only works while every replica runs on the same host (not with `--address` on a
multi-node cluster), it needs the environment variable set before any Ray worker imports
prometheus_client (Ray's own agents would then write into our directory too), it cannot run custom
collectors (our prompt-cache and memory values are read at collection time) and it needs dead-pid
cleanup. A Serve handle cannot address "every replica" either: requests are load-balanced.

So each replica snapshots its own registry every `PUSH_INTERVAL_S` and sends it to the single
`MetricsHub` replica; the ingress `/metrics` merges the latest snapshot of every replica, adding
`deployment` and `replica` labels so series of different replicas stay distinct (sum them in
PromQL). Values are therefore at most about one push interval old; a replica that stopped pushing
(it died or was scaled down) disappears after `STALE_AFTER_S`, as a scrape target would.
"""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from ray import serve

log = logging.getLogger(__name__)

PUSH_INTERVAL_S = 0.5
STALE_AFTER_S = 15.0

# (name, type, documentation, unit, [(sample name, labels, value), ...]): plain data, cheap to ship.
Family = tuple[str, str, str, str, list[tuple[str, dict[str, str], float]]]


def snapshot(registry: CollectorRegistry, labels: dict[str, str]) -> list[Family]:
    """The registry's current values, with `labels` added to every sample."""
    families = []
    for metric in registry.collect():
        samples = [(s.name, {**s.labels, **labels}, s.value) for s in metric.samples]
        families.append((metric.name, metric.type, metric.documentation, metric.unit, samples))
    return families


class _Families:
    """Adapter so `generate_latest` can render already collected families."""

    def __init__(self, families: list[Metric]):
        self._families = families

    def collect(self):
        return iter(self._families)


def render(snapshots: list[list[Family]]) -> bytes:
    """Prometheus text exposition of several replicas' snapshots, one family per metric name."""
    merged: dict[str, Metric] = {}
    for families in snapshots:
        for name, typ, doc, unit, samples in families:
            metric = merged.get(name)
            if metric is None:
                metric = merged[name] = Metric(name, doc, typ, unit)
            for sample_name, labels, value in samples:
                metric.add_sample(sample_name, labels, value)
    return generate_latest(_Families([merged[n] for n in sorted(merged)]))


# Pushes take a millisecond and nothing waits on them: a shutdown need not wait Serve's default
# 2 s loop for them to drain (the ingress and the model replicas wait 0.5 s too).
@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000,
                  graceful_shutdown_wait_loop_s=0.5,
                  logging_config={"enable_access_log": False})  # two pushes per second per replica
class MetricsHub:
    def __init__(self):
        self._latest: dict[str, tuple[float, list[Family]]] = {}

    def push(self, source: str, families: list[Family]) -> None:
        self._latest[source] = (time.monotonic(), families)

    def collect(self) -> dict[str, list[Family]]:
        cutoff = time.monotonic() - STALE_AFTER_S
        self._latest = {s: v for s, v in self._latest.items() if v[0] >= cutoff}
        return {source: families for source, (_, families) in self._latest.items()}


class MetricsPublisher:
    """Runs in a replica's event loop: pushes that replica's registry to the hub periodically."""

    def __init__(self, hub, registry: CollectorRegistry):
        context = serve.get_replica_context()
        self.source = f"{context.deployment}#{context.replica_id.unique_id}"
        self.labels = {"deployment": context.deployment, "replica": context.replica_id.unique_id}
        self.hub = hub
        self.registry = registry
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def local_snapshot(self) -> list[Family]:
        return snapshot(self.registry, self.labels)

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                await self.hub.push.remote(self.source, self.local_snapshot())
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the hub restarting must not stop this replica's publishing
                failures += 1
                if failures == 1:
                    log.warning("cannot push metrics to the hub (will retry): %r", exc)
            await asyncio.sleep(PUSH_INTERVAL_S)
