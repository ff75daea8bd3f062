"""The requests a task-affinity router has given a replica that have not finished, per (replica,
task): the counts behind the per-task spill (serving/routing/affinity.py, `within_task_share`).

Up when the router gives a replica to a request (its `_fulfill_next_pending_request`, before the
request is sent), down in Serve's `on_request_completed(replica_id, internal_request_id)` hook,
which Serve fires once for every request sent to a replica, whether it finished, failed, was
cancelled or was rejected by a full replica (a rejected request is routed again: counted again).
Counting up at acceptance instead (`on_request_routed`) lags by a round trip to the replica, and a
flood's burst is routed within that round trip: its decisions would not see each other. The
completion hook names the request only by `internal_request_id`, which
every handle call made while serving one HTTP request shares; they share its task too (one task
per request), so which of them finished does not matter for the per-task counts. Counts are this
router's own: other routers' requests show only in the replicas' queue lengths.

One gap: a caller cancelled in the very loop turn between its request being given a replica and
being sent is never sent, so never completed, and its count would stay. So a replica that answers
a probe with an empty queue has its counts cleared (`clear`): a request still on its way there is
then not counted, which errs towards the total bound alone, never towards a spill.
"""

from __future__ import annotations

import threading
from collections import Counter


class InFlight:
    """In-flight requests per replica and task; thread-safe (Serve may run the router on its own
    event-loop thread)."""

    def __init__(self):
        self._held: dict[str, Counter[str]] = {}
        self._tasks: dict[tuple[str, str], list[str]] = {}
        self._lock = threading.Lock()

    def start(self, replica: str, request_id: str, task_id: str) -> None:
        with self._lock:
            self._held.setdefault(replica, Counter())[task_id] += 1
            self._tasks.setdefault((replica, request_id), []).append(task_id)

    def finish(self, replica: str, request_id: str) -> None:
        """One request `request_id` on `replica` is done; one never started (a call without a task
        id) is a no-op, so a count never goes below zero. Empty entries are dropped: memory follows
        the requests in flight, not every task or request ever routed."""
        with self._lock:
            tasks = self._tasks.get((replica, request_id))
            if not tasks:
                return
            task_id = tasks.pop()
            if not tasks:
                del self._tasks[(replica, request_id)]
            held = self._held[replica]
            held[task_id] -= 1
            if held[task_id] <= 0:
                del held[task_id]
            if not held:
                del self._held[replica]

    def clear(self, replica: str) -> None:
        """The replica reported an empty queue: nothing of this router's is in flight there."""
        with self._lock:
            self._held.pop(replica, None)
            for key in [k for k in self._tasks if k[0] == replica]:
                del self._tasks[key]

    def on(self, replica: str) -> dict[str, int]:
        """A copy of the replica's in-flight requests per task."""
        with self._lock:
            return dict(self._held.get(replica, {}))
