"""HTTP errors of the API: status, a message that names the problem, and one JSON shape for all.

Model replicas do not raise domain errors across Ray (Ray wraps them with a remote traceback);
they return a `Refusal` (`refusal_for(exc)`) and the ingress raises `ServingError.from_refusal`.
The body follows the OpenAI / vLLM error shape, so the `openai` client reports the message:
`{"error": {"message": ..., "type": ..., "code": <status>}}`.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi.responses import JSONResponse

from lamp_runtime.errors import (
    AdapterError,
    EngineStoppedError,
    InputTooLongError,
    QueueFullError,
    RequestError,
    UnknownTaskError,
    UnservableTaskError,
    UnsupportedRequestError,
)

RETRY_AFTER_S = 1
REPLICA_HEADER = "x-lamp-replica"

_TYPES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 409: "conflict", 413: "payload_too_large",
    422: "invalid_request", 500: "internal_error", 503: "overloaded",
}

# Most specific first: InputTooLongError and UnsupportedRequestError are RequestErrors.
_STATUS_OF = ((UnknownTaskError, 404), (UnservableTaskError, 409), (InputTooLongError, 413),
              (UnsupportedRequestError, 400), (RequestError, 422), (AdapterError, 422), (QueueFullError, 503),
              (EngineStoppedError, 503))


@dataclass(frozen=True)
class Refusal:
    """A request a model replica refused, or a stream it had to end: what crosses Ray instead of
    an exception. `status` is the HTTP status the ingress answers."""

    status: int
    message: str
    replica: str | None = None


class ServingError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}

    @classmethod
    def from_refusal(cls, refusal: Refusal) -> "ServingError":
        """From a replica's refusal; says which replica answered (header), like successes do."""
        headers = {"Retry-After": str(RETRY_AFTER_S)} if refusal.status == 503 else {}
        if refusal.replica:
            headers[REPLICA_HEADER] = refusal.replica
        return cls(refusal.status, refusal.message, headers)

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.headers)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": _TYPES.get(status, "error"), "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def refusal_for(exc: BaseException, replica: str | None = None) -> Refusal | None:
    """The refusal for an error a model replica expects; None for a bug (let it raise)."""
    status = next((code for kind, code in _STATUS_OF if isinstance(exc, kind)), None)
    if status is None:
        return None
    message = str(exc)
    if isinstance(exc, QueueFullError):
        message = f"server overloaded: {exc}; retry after {RETRY_AFTER_S} s"
    elif isinstance(exc, EngineStoppedError):
        message = f"engine unavailable: {exc}"
    return Refusal(status, message, replica)
