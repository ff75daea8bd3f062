"""HTTP errors of the API: status, a message that names the problem, and one JSON shape for all.

The body follows the OpenAI / vLLM error shape, so the `openai` client reports the message:
`{"error": {"message": ..., "type": ..., "code": <status>}}`. What a model replica refuses crosses
Ray as a `Refusal` (serving/transport.py, no HTTP code) and becomes a `ServingError` at the ingress.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

REPLICA_HEADER = "x-lamp-replica"

_TYPES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 409: "conflict", 413: "payload_too_large", 429: "rate_limited",
    422: "invalid_request", 500: "internal_error", 503: "overloaded",
}


class ServingError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.headers)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": _TYPES.get(status, "error"), "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)
