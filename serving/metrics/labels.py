"""Bounded `task` label values, shared by the ingress and the replicas' metrics."""

from __future__ import annotations

import threading

OTHER_TASK = "other"


class TaskLabels:
    """Bounded `task` label values: registered tasks, first come first served up to `limit`, else "other".

    Unknown task ids (anyone can send any string) never become label values, so a client cannot
    grow the metric set without bound; with 100,000 registered tasks only the first `limit` seen
    get their own series.
    """

    def __init__(self, limit: int = 64):
        self.limit = limit
        self._labels: set[str] = set()
        self._lock = threading.Lock()  # replicas label from their engine thread and their event loop

    def label(self, task_id: str | None, registered: bool) -> str:
        if not task_id or not registered:
            return OTHER_TASK
        with self._lock:
            if task_id in self._labels:
                return task_id
            if len(self._labels) < self.limit:
                self._labels.add(task_id)
                return task_id
        return OTHER_TASK
