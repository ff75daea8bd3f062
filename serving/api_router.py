"""HTTP routes (FastAPI) and the ingress deployment that serves them.

The ingress holds no model: it validates requests, enforces body-size limits, checks the admin
token, talks to the adapter store for admin calls, and forwards generation to the model deployment
(serving/generation.py). Routes stay thin; the logic lives in generation.py and admin.py.
"""

from __future__ import annotations

import asyncio
import logging
import os

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from ray import serve
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .admin import TOKEN_ENV, UPLOAD_FILE_FIELDS, UPLOAD_FORM_FIELDS, AdapterAdmin, AdminAuth
from .config import ServeSettings
from .generation import GenerationService
from .http_errors import ServingError, error_response
from .metrics import IngressMetrics
from .metrics_hub import MetricsPublisher, render
from .protocol import AdapterInfo, AdapterList, CompletionRequest, GenerateRequest, HealthResponse, ModelCard, ModelList
from .object_store import open_store
from .store import StoredAdapter

log = logging.getLogger(__name__)

GENERATION_PATHS = ("/generate", "/v1/completions")
UPLOAD_PREFIX = "/admin/adapters/"
HEALTH_TIMEOUT_S = 10.0
METRICS_TIMEOUT_S = 5.0

app = FastAPI(title="lamp-serve", summary="Many tuned soft prompts over one shared backbone")


# ---- request body limits ---------------------------------------------------------------------------


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
        is_upload = scope["method"] == "PUT" and scope["path"].startswith(UPLOAD_PREFIX)
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


app.add_middleware(BodyLimitMiddleware)
app.state.body_limits = (ServeSettings.max_request_bytes, ServeSettings.max_upload_bytes)


# ---- one error shape for every failure ------------------------------------------------------------


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
    # A bug, not a client error: the traceback goes to the log (Starlette re-raises after this), the
    # client gets the usual JSON shape instead of a plain-text 500.
    return error_response(500, "internal server error (details in the server log)")


def _adapter_info(stored: StoredAdapter) -> dict:
    return AdapterInfo(**stored.to_json()).model_dump()


@serve.deployment(ray_actor_options={"num_cpus": 0}, graceful_shutdown_wait_loop_s=0.5,
                  graceful_shutdown_timeout_s=10.0)
@serve.ingress(app)
class LampIngress:
    def __init__(self, model, hub, settings_args: dict):
        from lamp_runtime.adapters import AdapterLimits

        settings = ServeSettings.from_mapping(settings_args)
        app.state.body_limits = (settings.max_request_bytes, settings.max_upload_bytes)
        self.metrics = IngressMetrics()
        app.state.ingress_metrics = self.metrics
        self.model = model
        self.hub = hub
        self.auth = AdminAuth(os.environ.get(TOKEN_ENV))
        self.admin = AdapterAdmin(open_store(settings.store_location),
                                  AdapterLimits(max_file_bytes=settings.max_upload_bytes))
        self.generation = GenerationService(model, self.metrics)
        self.publisher = MetricsPublisher(hub, self.metrics.registry)
        self.publisher.start()
        self._hidden_size: int | None = None
        log.info("ingress ready (admin API %s)", "enabled" if self.auth.enabled else f"disabled: {TOKEN_ENV} unset")

    # ---- inference --------------------------------------------------------------------------------

    @app.post("/generate")
    async def generate(self, request: GenerateRequest):
        return await self.generation.generate(request)

    @app.post("/v1/completions")
    async def completions(self, request: CompletionRequest):
        return await self.generation.completions(request)

    @app.get("/v1/models")
    async def models(self) -> ModelList:
        adapters = await asyncio.to_thread(self.admin.list)
        return ModelList(data=[ModelCard(id=a.task_id, created=int(a.created_at)) for a in adapters])

    # ---- operations -------------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz(self):
        try:
            info = await asyncio.wait_for(self.model.info.remote(), HEALTH_TIMEOUT_S)
        except Exception as exc:
            return error_response(503, f"model not ready: {exc.__class__.__name__}")
        if not info["healthy"]:
            return error_response(503, "engine loop is not running")
        return HealthResponse(status="ok", backbone=info["backbone"], replica=info["replica"])

    @app.get("/metrics")
    async def metrics(self):
        own = self.publisher.local_snapshot()
        try:
            latest = await asyncio.wait_for(self.hub.collect.remote(), METRICS_TIMEOUT_S)
        except Exception as exc:  # still expose what this process knows
            log.warning("metrics hub unavailable: %r", exc)
            latest = {}
        others = [families for source, families in latest.items() if source != self.publisher.source]
        return Response(render([own, *others]), media_type=CONTENT_TYPE_LATEST)

    # ---- admin ------------------------------------------------------------------------------------

    @app.put("/admin/adapters/{task_id:path}", status_code=201)
    async def put_adapter(self, task_id: str, request: Request):
        self.auth.check(request.headers.get("authorization"))
        files, pool = await self._read_upload(request)
        hidden_size = await self._backbone_hidden_size()
        stored = await asyncio.to_thread(self.admin.register, task_id, files, pool, hidden_size)
        return JSONResponse(_adapter_info(stored), status_code=201)

    @app.get("/admin/adapters")
    async def list_adapters(self, request: Request):
        self.auth.check(request.headers.get("authorization"))
        adapters = await asyncio.to_thread(self.admin.list)
        return AdapterList(adapters=[AdapterInfo(**a.to_json()) for a in adapters])

    @app.get("/admin/adapters/{task_id:path}")
    async def get_adapter(self, task_id: str, request: Request):
        self.auth.check(request.headers.get("authorization"))
        return _adapter_info(await asyncio.to_thread(self.admin.get, task_id))

    @app.delete("/admin/adapters/{task_id:path}")
    async def delete_adapter(self, task_id: str, request: Request):
        self.auth.check(request.headers.get("authorization"))
        stored = await asyncio.to_thread(self.admin.delete, task_id)
        return {"task_id": stored.task_id, "deleted_version": stored.version}

    async def _read_upload(self, request: Request) -> tuple[dict[str, bytes], str | None]:
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            raise ServingError(422, "upload must be multipart/form-data with file field 'adapter' "
                                    "or 'adapter_config' + 'adapter_model' (got content type "
                                    f"{content_type or 'none'!r})")
        try:
            form = await request.form(max_files=len(UPLOAD_FILE_FIELDS), max_fields=8, max_part_size=64 * 1024)
        except StarletteHTTPException as exc:
            if exc.status_code == 413:
                raise
            raise ServingError(422, f"malformed multipart upload: {exc.detail}") from None
        try:
            unknown = sorted(set(form.keys()) - set(UPLOAD_FILE_FIELDS) - set(UPLOAD_FORM_FIELDS))
            if unknown:
                raise ServingError(422, f"unexpected form fields {unknown}; expected file fields "
                                        f"{list(UPLOAD_FILE_FIELDS)} and optional field 'pool'")
            files = {}
            for name in UPLOAD_FILE_FIELDS:
                values = form.getlist(name)
                if len(values) > 1:
                    raise ServingError(422, f"form field {name!r} was sent {len(values)} times")
                if values:
                    if not isinstance(values[0], UploadFile):
                        raise ServingError(422, f"form field {name!r} must be a file upload, not a text value")
                    files[name] = await values[0].read()
            pool = form.get("pool")
            if pool is not None and not isinstance(pool, str):
                raise ServingError(422, "form field 'pool' must be a text value, not a file")
            return files, pool
        finally:
            await form.close()

    async def _backbone_hidden_size(self) -> int:
        if self._hidden_size is None:
            try:
                info = await asyncio.wait_for(self.model.info.remote(), HEALTH_TIMEOUT_S)
            except Exception as exc:
                raise ServingError(503, f"model not ready, cannot validate the adapter: {exc.__class__.__name__}",
                                   {"Retry-After": "1"}) from None
            self._hidden_size = int(info["hidden_size"])
        return self._hidden_size
