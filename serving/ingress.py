"""The router: HTTP routes (FastAPI) and the ingress deployment that serves them.

The ingress holds no model: it validates requests, enforces body-size limits, checks the admin
token, talks to the adapter store for admin calls, and forwards generation to the model deployment.
Routes stay thin and are the one place that builds HTTP responses: generation (serving/generation.py,
chat: chat_completions.py) answers a typed `Reply` or `EventStream`, admin (serving/admin.py) typed
records; schemas, uploads, limits and error handlers are serving/http/'s.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from ray import serve

from .admin import AdapterAdmin, limits_json
from .chat_completions import ChatCompletions
from .config import ServeSettings
from .generation import EventStream, GenerationService, Reply
from .http import middleware
from .http.auth import TOKEN_ENV, AdminAuth
from .http.chat import ChatCompletionRequest
from .http.errors import REPLICA_HEADER, ServingError, error_response
from .http.paging import page_query
from .http.protocol import (
    AdapterList,
    BatchResponse,
    CompletionRequest,
    GenerateRequest,
    HealthResponse,
    ModelCard,
    ModelList,
)
from .http.uploads import read_batch_upload, read_upload
from .metrics.hub import MetricsPublisher, render
from .metrics.ingress import IngressMetrics
from .replica import ReplicaInfo
from .status import StatusBoard, current_sums
from .store.registry import open_store

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 10.0
METRICS_TIMEOUT_S = 5.0
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
STATUS_PAGE = (Path(__file__).parent / "http" / "status_page.html").read_text(encoding="utf-8")


def http_response(answer: Reply | EventStream) -> Response:
    """The HTTP response for a typed answer. Above the deployment class: `@serve.ingress` pickles the
    routes while the class is being defined, with the module's globals that exist by then."""
    if isinstance(answer, EventStream):
        return StreamingResponse(answer.events, media_type="text/event-stream", headers=SSE_HEADERS)
    return JSONResponse(answer.body, headers=None if answer.replicas is None else {REPLICA_HEADER: answer.replicas})


app = FastAPI(title="lamp-serve", summary="Many tuned soft prompts over one shared backbone")
middleware.install(app, (ServeSettings.max_request_bytes, ServeSettings.max_upload_bytes))


@serve.deployment(ray_actor_options={"num_cpus": 0}, graceful_shutdown_wait_loop_s=0.5,
                  graceful_shutdown_timeout_s=10.0)
@serve.ingress(app)
class LampIngress:
    def __init__(self, model, hub, settings: ServeSettings):
        from lamp_runtime.adapters import AdapterLimits

        app.state.body_limits = (settings.max_request_bytes, settings.max_upload_bytes)
        self.metrics = IngressMetrics()
        app.state.ingress_metrics = self.metrics
        self.model = model
        self.hub = hub
        self.auth = AdminAuth(os.environ.get(TOKEN_ENV))
        self.admin = AdapterAdmin(open_store(settings.store_location, settings.registry),
                                  AdapterLimits(max_file_bytes=settings.max_upload_bytes))
        self.generation = GenerationService(model, self.metrics)
        self.chat = ChatCompletions(self.generation, settings.max_new_tokens)
        self.publisher = MetricsPublisher(hub, self.metrics.registry)
        self.publisher.start()
        self.board = StatusBoard()
        self._status_sampler = asyncio.get_running_loop().create_task(self._sample_status())
        self._hidden_size: int | None = None
        log.info("ingress ready (admin API %s)", "enabled" if self.auth.enabled else f"disabled: {TOKEN_ENV} unset")

    # ---- inference --------------------------------------------------------------------------------

    @app.post("/generate")
    async def generate(self, request: GenerateRequest):
        return http_response(await self.generation.generate(request))

    @app.post("/v1/completions")
    async def completions(self, request: CompletionRequest):
        return http_response(await self.generation.completions(request))

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: ChatCompletionRequest):
        return http_response(await self.chat.create(request))

    @app.get("/v1/models")
    async def models(self, page: tuple = Depends(page_query)) -> ModelList:
        found = await asyncio.to_thread(self.admin.page, *page)
        return ModelList.of(found, data=[ModelCard(id=a.task_id, created=int(a.created_at)) for a in found.adapters])

    # ---- operations -------------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz(self):
        try:
            info: ReplicaInfo = await asyncio.wait_for(self.model.info.remote(), HEALTH_TIMEOUT_S)
        except Exception as exc:
            return error_response(503, f"model not ready: {exc.__class__.__name__}")
        if not info.healthy:
            return error_response(503, "engine loop is not running")
        return HealthResponse(status="ok", backbone=info.backbone, replica=info.replica)

    @app.get("/metrics")
    async def metrics(self):
        return Response(render(await self._snapshots()), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def status_page(self):
        """The status page: no build step, no CDN; it polls /status.json. Shows nothing secret."""
        return HTMLResponse(STATUS_PAGE)

    @app.get("/status.json")
    async def status(self):
        sums = current_sums(await self._snapshots())
        adapters = await asyncio.to_thread(self.admin.list)
        return self.board.view(sums, adapters)

    async def _snapshots(self) -> list:
        """This process's metric families and the latest of every replica's (from the hub)."""
        own = self.publisher.local_snapshot()
        try:
            latest = await asyncio.wait_for(self.hub.collect.remote(), METRICS_TIMEOUT_S)
        except Exception as exc:  # still expose what this process knows
            log.warning("metrics hub unavailable: %r", exc)
            latest = {}
        return [own, *(families for source, families in latest.items() if source != self.publisher.source)]

    async def _sample_status(self) -> None:
        """Feed the status board's history (its chart and rates) whether or not a page is open."""
        while True:
            await asyncio.sleep(self.board.sample_every_s)
            try:
                self.board.record(current_sums(await self._snapshots()))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a missed point only leaves a gap in the chart
                log.debug("status sample failed: %r", exc)

    # ---- admin ------------------------------------------------------------------------------------

    @app.put("/admin/adapters/{task_id:path}", status_code=201)
    async def put_adapter(self, task_id: str, request: Request):
        self.auth.check(request.headers.get("authorization"))
        files, pool = await read_upload(request)
        hidden_size = await self._backbone_hidden_size()
        stored = await asyncio.to_thread(self.admin.register, task_id, files, pool, hidden_size)
        return JSONResponse(stored.to_json(), status_code=201)

    @app.post("/admin/adapters")
    async def register_batch(self, request: Request) -> BatchResponse:
        """Many adapters in one request (`adapter.<task id>` fields); each stored whole or not at all."""
        self.auth.check(request.headers.get("authorization"))
        batch = await read_batch_upload(request)
        hidden_size = await self._backbone_hidden_size()
        results = await asyncio.to_thread(self.admin.register_batch, batch, hidden_size)
        registered = sum(r["status"] == 201 for r in results)
        return BatchResponse(registered=registered, failed=len(results) - registered, results=results)

    @app.get("/admin/adapters")
    async def list_adapters(self, request: Request, page: tuple = Depends(page_query)):
        self.auth.check(request.headers.get("authorization"))
        found = await asyncio.to_thread(self.admin.page, *page)
        return AdapterList.of(found, adapters=found.adapters)

    @app.get("/admin/adapters/{task_id:path}")
    async def get_adapter(self, task_id: str, request: Request):
        self.auth.check(request.headers.get("authorization"))
        return (await asyncio.to_thread(self.admin.get, task_id)).to_json()

    @app.delete("/admin/adapters/{task_id:path}")
    async def delete_adapter(self, task_id: str, request: Request):
        self.auth.check(request.headers.get("authorization"))
        stored = await asyncio.to_thread(self.admin.delete, task_id)
        return {"task_id": stored.task_id, "deleted_version": stored.version}

    @app.get("/admin/tasks/{task_id}/limits")
    async def get_task_limits(self, task_id: str, request: Request):
        self.auth.check(request.headers.get("authorization"))
        return limits_json(await asyncio.to_thread(self.admin.get, task_id))

    @app.put("/admin/tasks/{task_id}/limits")
    async def put_task_limits(self, task_id: str, request: Request):
        """The task's weight and queue limit, recorded in the registry; every replica applies them
        with its next sync (before its next request)."""
        self.auth.check(request.headers.get("authorization"))
        try:
            body = await request.json()
        except ValueError:
            raise ServingError(422, "task limits must be a JSON object with 'weight' and/or 'max_waiting'") from None
        return limits_json(await asyncio.to_thread(self.admin.set_limits, task_id, body))

    async def _backbone_hidden_size(self) -> int:
        if self._hidden_size is None:
            try:
                info: ReplicaInfo = await asyncio.wait_for(self.model.info.remote(), HEALTH_TIMEOUT_S)
            except Exception as exc:
                raise ServingError(503, f"model not ready, cannot validate the adapter: {exc.__class__.__name__}",
                                   {"Retry-After": "1"}) from None
            self._hidden_size = info.hidden_size
        return self._hidden_size
