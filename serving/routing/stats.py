"""Where the task-affinity router's requests went, counted in the process the router runs in.

Serve runs a deployment's request router inside each caller's process: for the model deployment
that is the ingress. So the counts live here, process-wide, and the ingress metrics read them at
collection time (serving/metrics/ingress.py), which the metrics hub then merges over all ingresses.
"""

from __future__ import annotations

import threading
from collections import Counter

PREFERRED = "preferred"
SPILLED = "spilled"


class RoutingCounts:
    """Requests routed per (model replica, preferred|spilled); thread-safe (Serve may run the
    router on its own event-loop thread)."""

    def __init__(self):
        self._counts: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    def count(self, replica: str, spilled: bool) -> None:
        with self._lock:
            self._counts[(replica, SPILLED if spilled else PREFERRED)] += 1

    def snapshot(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._counts)


ROUTED = RoutingCounts()


def count_routed(replica: str, spilled: bool) -> None:
    """What the router calls. A function, not `ROUTED` itself: Serve ships the router's module to
    the caller pickled by value (RequestRouterConfig), which would give the router its own copy of
    a module-level object; a function of this module is pickled by reference, so the count lands
    in the `ROUTED` that the ingress metrics read."""
    ROUTED.count(replica, spilled)
