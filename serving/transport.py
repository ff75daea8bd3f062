"""What crosses Ray between the ingress and a model replica besides the runtime's own request and
result shapes (lamp_runtime/requests.py): `ReplicaResults` (a generation's results and the replica
that produced them) and a `Refusal` in place of an exception.

Model replicas do not raise the errors a client can cause across Ray (Ray wraps them with a remote
traceback); they return `refusal_for(exc)`, which carries the HTTP status the ingress answers with.
No FastAPI here: the replica imports this module, and only the ingress builds HTTP responses.
"""

from __future__ import annotations

from dataclasses import dataclass

from lamp_runtime.errors import (
    AdapterError,
    EngineStoppedError,
    InputTooLongError,
    QueueFullError,
    RequestError,
    TaskQueueFullError,
    UnknownTaskError,
    UnservableTaskError,
    UnsupportedRequestError,
)
from lamp_runtime.requests import GenerationResult

# What a 503 or 429 tells the client to wait (Retry-After), ours and Serve's back-pressure alike.
RETRY_AFTER_S = 1

# Most specific first: InputTooLongError and UnsupportedRequestError are RequestErrors, a task over
# its share of the queue (429: that task should slow down) is a QueueFullError (503: everyone).
_STATUS_OF = ((TaskQueueFullError, 429), (UnknownTaskError, 404), (UnservableTaskError, 409), (InputTooLongError, 413),
              (UnsupportedRequestError, 400), (RequestError, 422), (AdapterError, 422), (QueueFullError, 503),
              (EngineStoppedError, 503))


@dataclass(frozen=True)
class ReplicaResults:
    """A whole generation's answer: its n samples' results, and the replica that produced them
    (the ingress names it in the x-lamp-replica header)."""

    results: list[GenerationResult]
    replica: str


@dataclass(frozen=True)
class Refusal:
    """A request a model replica refused, or a stream it had to end: what crosses Ray instead of
    an exception. `status` is the HTTP status the ingress answers."""

    status: int
    message: str
    replica: str | None = None


def refusal_for(exc: BaseException, replica: str | None = None) -> Refusal | None:
    """The refusal for an error a model replica expects; None for a bug (let it raise)."""
    status = next((code for kind, code in _STATUS_OF if isinstance(exc, kind)), None)
    if status is None:
        return None
    message = str(exc)
    if isinstance(exc, TaskQueueFullError):
        message = f"too many requests of this task waiting: {exc}; retry after {RETRY_AFTER_S} s"
    elif isinstance(exc, QueueFullError):
        message = f"server overloaded: {exc}; retry after {RETRY_AFTER_S} s"
    elif isinstance(exc, EngineStoppedError):
        message = f"engine unavailable: {exc}"
    return Refusal(status, message, replica)
