"""The admin API's logic: adapter registration, listing and deletion against the store, with each
outcome as the HTTP error the route answers (it sits beside generation.py, above the store).
"""

from __future__ import annotations

import logging

from lamp_runtime.adapters import AdapterLimits
from lamp_runtime.adapters.registry import validate_task_id
from lamp_runtime.errors import AdapterError

from .http.errors import ServingError
from .store import AdapterStore, StoredAdapter, StoreError
from .store.files import adapter_from_upload, parse_pool_field, store_adapter

log = logging.getLogger(__name__)


class AdapterAdmin:
    def __init__(self, store: AdapterStore, limits: AdapterLimits):
        self.store = store
        self.limits = limits

    def register(self, task_id: str, files: dict[str, bytes], pool: str | None, hidden_size: int) -> StoredAdapter:
        """Validate the upload against the backbone, then store it as the task's next version.

        Blocking (parses tensors, fsyncs): the ingress runs it in a worker thread.
        """
        size = sum(len(data) for data in files.values())
        if size > self.limits.max_file_bytes:
            raise ServingError(413, f"adapter upload is {size} bytes, over the limit of "
                                    f"{self.limits.max_file_bytes} bytes")
        try:
            validate_task_id(task_id)
            adapter = adapter_from_upload(files.get("adapter"), files.get("adapter_config"),
                                          files.get("adapter_model"), parse_pool_field(pool), hidden_size, self.limits)
            return store_adapter(self.store, task_id, adapter, hidden_size, self.limits)
        except AdapterError as exc:
            raise ServingError(422, f"adapter for task {task_id!r} rejected: {exc}") from None
        except (StoreError, OSError) as exc:
            log.error("adapter store write failed for %s: %s", task_id, exc)
            raise ServingError(500, f"adapter store write failed, previous version unchanged: {exc}") from None

    def get(self, task_id: str) -> StoredAdapter:
        stored = self._read(lambda: self.store.get(task_id))
        if stored is None:
            raise ServingError(404, f"no adapter registered for task {task_id!r}")
        return stored

    def list(self) -> list[StoredAdapter]:
        return self._read(self.store.list)

    def delete(self, task_id: str) -> StoredAdapter:
        try:
            stored = self.store.delete(task_id)
        except AdapterError:  # an invalid id cannot name a stored task
            stored = None
        except StoreError as exc:
            raise ServingError(500, str(exc)) from None
        if stored is None:
            raise ServingError(404, f"no adapter registered for task {task_id!r}")
        return stored

    @staticmethod
    def _read(read):
        try:
            return read()
        except StoreError as exc:
            raise ServingError(500, str(exc)) from None
