"""Request-body limits and one JSON error shape for every failure, installed on the ingress app."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import ServingError, error_response

GENERATION_PATHS = ("/generate", "/v1/completions", "/v1/chat/completions")
UPLOAD_PREFIX = "/admin/adapters/"
BATCH_PATH = "/admin/adapters"  # POST: a batch registration, bounded like one upload


class BodyLimitMiddleware:
    """413 for bodies over the limit: at once from Content-Length, or while reading a chunked body.

    Uploads (`PUT /admin/adapters/...`) get `max_upload_bytes` plus room for multipart framing;
    everything else gets `max_request_bytes`. Limits come from `app.state.body_limits`, set by the
    ingress replica from its settings.
    """

    MULTIPART_OVERHEAD = 64 * 1024

    def __init__(self, asgi_app):
        self.app = asgi_app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_limit, upload_limit = scope["app"].state.body_limits
        is_upload = ((scope["method"] == "PUT" and scope["path"].startswith(UPLOAD_PREFIX))
                     or (scope["method"] == "POST" and scope["path"] == BATCH_PATH))
        limit = upload_limit + self.MULTIPART_OVERHEAD if is_upload else request_limit
        what = "adapter upload" if is_upload else "request body"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            response = error_response(413, f"{what} is {int(declared)} bytes, over the limit of {limit} bytes")
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise StarletteHTTPException(413, f"{what} is over the limit of {limit} bytes")
            return message

        return await self.app(scope, limited_receive, send)


def install(app: FastAPI, body_limits: tuple[int, int]) -> None:
    """Body limits (max request bytes, max upload bytes) and the error handlers, on `app`."""
    app.add_middleware(BodyLimitMiddleware)
    app.state.body_limits = body_limits

    @app.exception_handler(ServingError)
    async def _serving_error(request: Request, exc: ServingError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ())[1:]) or "body"
            problems.append(f"{where}: {err.get('msg')}")
        if request.url.path in GENERATION_PATHS:
            request.app.state.ingress_metrics.count_request(None, False, 422)
        return error_response(422, "invalid request: " + "; ".join(problems))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = str(exc.detail)
        if exc.status_code in (404, 405) and message in ("Not Found", "Method Not Allowed"):  # no route matched
            message = f"{message}: no route for {request.method} {request.scope['path']!r}"
        return error_response(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected_error(request: Request, exc: Exception):
        # A bug, not a client error: the traceback goes to the log (Starlette re-raises after this),
        # the client gets the usual JSON shape instead of a plain-text 500.
        return error_response(500, "internal server error (details in the server log)")
