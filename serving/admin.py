"""The admin API's logic: adapter registration, listing and deletion against the store, and each
task's fair-queue limits, with each outcome as the HTTP error the route answers (it sits beside
generation.py, above the store).
"""

from __future__ import annotations

import logging

from lamp_runtime.adapters import AdapterLimits
from lamp_runtime.adapters.registry import validate_task_id
from lamp_runtime.engine.fair_queue import TaskLimits
from lamp_runtime.errors import AdapterError

from .http.errors import ServingError
from .store import AdapterStore, StoredAdapter, StoreError
from .store.base import AdapterPage
from .store.files import adapter_from_upload, parse_pool_field, store_adapter, store_adapters

log = logging.getLogger(__name__)

LIMIT_KEYS = frozenset({"weight", "max_waiting"})


def limits_json(stored: StoredAdapter) -> dict:
    """A task's limits as the admin API shows them (the defaults filled in)."""
    return {"task_id": stored.task_id, "weight": 1.0 if stored.weight is None else stored.weight,
            "max_waiting": stored.max_waiting}


class AdapterAdmin:
    def __init__(self, store: AdapterStore, limits: AdapterLimits):
        self.store = store
        self.limits = limits

    def register(self, task_id: str, files: dict[str, bytes], pool: str | None, hidden_size: int) -> StoredAdapter:
        """Validate the upload against the backbone, then store it as the task's next version.

        Blocking (parses tensors, fsyncs): the ingress runs it in a worker thread.
        """
        adapter = self._validated(task_id, files, pool, hidden_size)
        try:
            return store_adapter(self.store, task_id, adapter, hidden_size, self.limits)
        except AdapterError as exc:
            raise ServingError(422, f"adapter for task {task_id!r} rejected: {exc}") from None
        except (StoreError, OSError) as exc:
            raise self._write_failed(task_id, exc) from None

    def register_batch(self, batch: dict[str, tuple[dict[str, bytes], str | None]],
                       hidden_size: int) -> list[dict]:
        """Each adapter of a batch validated as `register` would, then all that passed stored with
        one commit: each whole or not at all. One result per task, in the order sent:
        {"task_id", "status" (201 or what a single PUT would answer), "adapter" | "error"}."""
        results: dict[str, dict] = {}
        valid = []
        for task_id, (files, pool) in batch.items():
            try:
                valid.append((task_id, self._validated(task_id, files, pool, hidden_size)))
            except ServingError as exc:
                results[task_id] = {"task_id": task_id, "status": exc.status, "error": exc.message}
        try:
            outcomes = store_adapters(self.store, valid, hidden_size, self.limits)
        except (StoreError, OSError) as exc:  # the commit itself failed: none of these is stored
            outcomes = [exc] * len(valid)
        for (task_id, _), outcome in zip(valid, outcomes):
            if isinstance(outcome, AdapterError):
                error = ServingError(422, f"adapter for task {task_id!r} rejected: {outcome}")
            elif isinstance(outcome, Exception):
                error = self._write_failed(task_id, outcome)
            else:
                results[task_id] = {"task_id": task_id, "status": 201, "adapter": outcome.to_json()}
                continue
            results[task_id] = {"task_id": task_id, "status": error.status, "error": error.message}
        return [results[task_id] for task_id in batch]

    def _validated(self, task_id: str, files: dict[str, bytes], pool: str | None, hidden_size: int):
        size = sum(len(data) for data in files.values())
        if size > self.limits.max_file_bytes:
            raise ServingError(413, f"adapter upload is {size} bytes, over the limit of "
                                    f"{self.limits.max_file_bytes} bytes")
        try:
            validate_task_id(task_id)
            self.store.check_task_id(task_id)
            return adapter_from_upload(files.get("adapter"), files.get("adapter_config"),
                                       files.get("adapter_model"), parse_pool_field(pool), hidden_size, self.limits)
        except AdapterError as exc:
            raise ServingError(422, f"adapter for task {task_id!r} rejected: {exc}") from None

    @staticmethod
    def _write_failed(task_id: str, exc: Exception) -> ServingError:
        log.error("adapter store write failed for %s: %s", task_id, exc)
        return ServingError(500, f"adapter store write failed, previous version unchanged: {exc}")

    def page(self, limit: int, after: str | None) -> AdapterPage:
        """One page of the task list (a registry reads only that page, and the count it keeps)."""
        return self._read(lambda: self.store.page(limit, after))

    def get(self, task_id: str) -> StoredAdapter:
        stored = self._read(lambda: self.store.get(task_id))
        if stored is None:
            raise ServingError(404, f"no adapter registered for task {task_id!r}")
        return stored

    def list(self) -> list[StoredAdapter]:
        return self._read(self.store.list)

    def delete(self, task_id: str) -> StoredAdapter:
        return self._on_task(task_id, lambda: self.store.delete(task_id))

    def _on_task(self, task_id: str, change) -> StoredAdapter:
        """`change()` on the store for one task: an invalid id or a task not registered is a 404,
        a store failure a 500."""
        try:
            stored = change()
        except AdapterError:  # an invalid id cannot name a stored task
            stored = None
        except StoreError as exc:
            raise ServingError(500, str(exc)) from None
        if stored is None:
            raise ServingError(404, f"no adapter registered for task {task_id!r}")
        return stored

    def set_limits(self, task_id: str, body) -> StoredAdapter:
        """A registered task's fair-queue limits from a JSON body {"weight", "max_waiting"} (each
        optional; absent or null: the default), validated as the engines take them (TaskLimits)."""
        if not isinstance(body, dict) or set(body) - LIMIT_KEYS:
            unknown = sorted(set(body) - LIMIT_KEYS) if isinstance(body, dict) else type(body).__name__
            raise ServingError(422, f"task limits must be a JSON object with 'weight' and/or 'max_waiting'; "
                                    f"got {unknown}")
        weight, max_waiting = body.get("weight"), body.get("max_waiting")
        try:
            TaskLimits(1.0 if weight is None else weight, max_waiting)
        except ValueError as exc:
            raise ServingError(422, f"limits for task {task_id!r} rejected: {exc}") from None
        return self._on_task(task_id, lambda: self.store.set_limits(task_id, weight, max_waiting))

    @staticmethod
    def _read(read):
        try:
            return read()
        except StoreError as exc:
            raise ServingError(500, str(exc)) from None
