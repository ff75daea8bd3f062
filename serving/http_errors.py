"""HTTP errors of the API: status, a message that names the problem, and one JSON shape for all.

Model replicas do not raise domain errors across Ray (Ray wraps them with a remote traceback);
they return `error_payload(exc)` and the ingress raises `ServingError.from_payload` instead.
The body follows the OpenAI / vLLM error shape, so the `openai` client reports the message:
`{"error": {"message": ..., "type": ..., "code": <status>}}`.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

RETRY_AFTER_S = 1
REPLICA_HEADER = "x-lamp-replica"

_TYPES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 409: "conflict", 413: "payload_too_large",
    422: "invalid_request", 500: "internal_error", 503: "overloaded",
}


class ServingError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}

    @classmethod
    def from_payload(cls, payload: dict) -> "ServingError":
        """From a replica's error dict; says which replica answered (header), like successes do."""
        headers = {"Retry-After": str(RETRY_AFTER_S)} if payload["status"] == 503 else {}
        if payload.get("replica"):
            headers[REPLICA_HEADER] = payload["replica"]
        return cls(payload["status"], payload["message"], headers)

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.headers)


class InputTooLongError(ValueError):
    """The input has more tokens than the engine accepts (413, not 422: it is about size)."""


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": _TYPES.get(status, "error"), "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def error_payload(exc: BaseException) -> dict | None:
    """Status and message for an error a model replica expects; None for a bug (let it raise)."""
    from lamp_runtime.async_engine import EngineStoppedError, QueueFullError
    from lamp_runtime.errors import AdapterError, RequestError, UnknownTaskError, UnservableTaskError

    if isinstance(exc, UnknownTaskError):
        status = 404
    elif isinstance(exc, UnservableTaskError):
        status = 409
    elif isinstance(exc, InputTooLongError):
        status = 413
    elif isinstance(exc, (RequestError, AdapterError)):
        status = 422
    elif isinstance(exc, QueueFullError):
        status, exc = 503, f"server overloaded: {exc}; retry after {RETRY_AFTER_S} s"
    elif isinstance(exc, EngineStoppedError):
        status, exc = 503, f"engine unavailable: {exc}"
    else:
        return None
    return {"status": status, "message": str(exc)}
