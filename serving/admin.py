"""The admin API's logic: bearer-token check and adapter registration into the store.

The token comes from the environment (`LAMP_ADMIN_TOKEN`) of the serving processes and is compared
in constant time; it never appears in a log line, an error message or a metric. Without it the
admin API is off rather than open.
"""

from __future__ import annotations

import hmac
import logging

from lamp_runtime.adapters import AdapterLimits
from lamp_runtime.errors import AdapterError
from lamp_runtime.registry import validate_task_id

from .adapter_files import adapter_from_upload, parse_pool, store_adapter
from .http_errors import ServingError
from .store import AdapterStore, StoredAdapter, StoreError

log = logging.getLogger(__name__)

TOKEN_ENV = "LAMP_ADMIN_TOKEN"
UPLOAD_FILE_FIELDS = ("adapter", "adapter_config", "adapter_model")
UPLOAD_FORM_FIELDS = ("pool",)


class AdminAuth:
    def __init__(self, token: str | None):
        self._token = token.encode("utf-8") if token else None

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def check(self, authorization: str | None) -> None:
        if self._token is None:
            raise ServingError(403, f"the admin API is disabled: set {TOKEN_ENV} in the server's environment "
                                    "and restart it to enable it")
        scheme, _, credentials = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise ServingError(401, f"admin API needs 'Authorization: Bearer <{TOKEN_ENV}>'",
                               headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(credentials.strip().encode("utf-8"), self._token):
            raise ServingError(403, "invalid admin token")


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
                                          files.get("adapter_model"), parse_pool(pool), hidden_size, self.limits)
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
