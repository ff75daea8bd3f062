"""The requests a task-affinity router has sent that have not finished, per (replica, task): the
counts behind the per-task spill (serving/routing/affinity.py, `within_task_share`).

Up when a replica accepts a request (the router's `on_request_routed`), down when that very
request's result is done, whatever the outcome. Serve's `on_request_completed(replica_id,
internal_request_id)` hook is not used to count down: it also fires for requests a replica rejected
(never counted up), every handle call made while serving one HTTP request shares its
`internal_request_id`, and for a request that ends at once it can run before `on_request_routed`,
which would leave a count that never goes down. Counts are this router's own: other routers'
requests show only in the replicas' queue lengths.
"""

from __future__ import annotations

import threading
from collections import Counter


class InFlight:
    """In-flight requests per replica and task; thread-safe (a result's done callback runs on a
    Ray worker or gRPC thread, the routing decisions on the router's event loop)."""

    def __init__(self):
        self._held: dict[str, Counter[str]] = {}
        self._lock = threading.Lock()

    def start(self, replica: str, task_id: str) -> None:
        with self._lock:
            self._held.setdefault(replica, Counter())[task_id] += 1

    def finish(self, replica: str, task_id: str) -> None:
        """One request of `task_id` on `replica` is done; finishing one never started is a no-op,
        so a count can never go below zero. Empty entries are dropped: memory follows the
        requests in flight, not every task ever routed."""
        with self._lock:
            held = self._held.get(replica)
            if held is None or held[task_id] <= 0:
                return
            held[task_id] -= 1
            if held[task_id] == 0:
                del held[task_id]
            if not held:
                del self._held[replica]

    def on(self, replica: str) -> dict[str, int]:
        """A copy of the replica's in-flight requests per task."""
        with self._lock:
            return dict(self._held.get(replica, {}))
