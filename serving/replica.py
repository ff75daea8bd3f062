"""The model deployment: one backbone per replica, one continuous batch for requests of every task.

Serve's `@serve.batch` and model multiplexing group requests by model id, i.e. by task, which is
exactly what we must not do: a LAMP adapter is only a few prepended embeddings, so requests of any
mix of tasks share one forward pass. Each replica therefore runs our own engine (one continuous
batch; lamp_runtime/engines/ builds it) and lets Serve deliver many concurrent requests to it (`max_ongoing_requests` is sized for a full batch
plus the waiting queue; see serving/app.py).

Requests and replies cross Ray as the runtime's own dataclasses (lamp_runtime/requests.py): a
`GenerationRequest` in, `StepOutput`s / `ReplicaResults` (the `GenerationResult`s and which
replica produced them) out. The replica uses only the engine contract: `submit` through the
streams adapter, `stats()` and observers for metrics, `healthy`, `discard`, `shutdown`. Errors a client can cause are
returned as a `Refusal` (serving/transport.py) rather than raised, so the ingress gets the status
and the message instead of a remote traceback, and nothing a client sends can take the replica down.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ray import serve

from lamp_runtime.engine.streams import complete_all, generate
from lamp_runtime.errors import UnservableTaskError
from lamp_runtime.requests import GenerationRequest, StepOutput

from .config import ServeSettings
from .transport import Refusal, ReplicaResults, refusal_for

log = logging.getLogger(__name__)

STORE_POLL_S = 0.2


@dataclass(frozen=True)
class ReplicaInfo:
    """What a replica says about itself (health checks, the admin API's hidden-size check)."""

    replica: str
    engine: str
    backbone: str
    hidden_size: int
    dtype: str
    quantization: str
    device: str
    max_input_tokens: int
    max_new_tokens: int
    registered_adapters: int
    healthy: bool


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=5.0,
    # In-flight generations get a moment to finish on shutdown, but Ctrl-C must stay quick.
    graceful_shutdown_wait_loop_s=0.5,
    graceful_shutdown_timeout_s=10.0,
    max_constructor_retry_count=2,  # a backbone that fails to load will not load on the 20th try
)
class LampModel:
    def __init__(self, settings: ServeSettings, hub):
        import torch

        from lamp_runtime.adapters import AdapterLimits
        from lamp_runtime.engines import build_engine

        from .metrics.hub import MetricsPublisher
        from .metrics.replica import ModelMetrics
        from .store.registry import open_store
        from .store.files import import_bundled
        from .store.sync import StoreSync

        self.settings = settings
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        # Ray sets OMP_NUM_THREADS from the replica's logical CPUs (1 for fractions); the cores
        # this replica may really use are its share of the machine. Only the engine loop thread
        # runs torch with them: loading (and every other thread) stays on one, or the engine's
        # decode steps pay an OpenMP wake-up per op (lamp_runtime/engine/step_loop.py).
        threads = settings.threads or max(1, (os.cpu_count() or 1) // settings.replicas)
        torch.set_num_threads(1)
        self.limits = AdapterLimits(max_file_bytes=settings.max_upload_bytes)
        self.engine = build_engine(settings.engine, settings.backbone_options(),
                                   dataclasses.replace(settings.engine_config(), threads=threads),
                                   settings.vllm_options(), llamacpp_options=settings.llamacpp_options())
        self.backbone = self.engine.backbone
        # Adapter loads (tensor checks) run on this one thread, single-threaded like the loading.
        self._store_thread = ThreadPoolExecutor(1, thread_name_prefix="store-poll",
                                                initializer=torch.set_num_threads, initargs=(1,))
        store = open_store(settings.store_location, settings.registry)
        import_bundled(store, settings.prompts_dir, self.backbone.hidden_size, self.limits)
        self.sync = StoreSync(store, self.engine.registry, self.engine, self.backbone.hidden_size, self.limits,
                              self.backbone.options, apply_limits=self.engine.set_task_limits)
        self.sync.refresh()
        self.metrics = ModelMetrics(self.engine, registered=lambda: len(self.engine.registry))
        self.engine.observe(self.metrics.observer)
        self.publisher = MetricsPublisher(hub, self.metrics.registry)
        self.publisher.start()
        self._poller = asyncio.get_running_loop().create_task(self._poll_store())
        log.info("replica %s ready: %s engine, backbone %s (%s, %s, %s), %d adapters, %d torch threads",
                 self.replica_id, self.engine.kind, self.backbone.name, self.backbone.options.dtype, self.backbone.options.quantization,
                 self.backbone.device, len(self.engine.registry), threads)

    # ---- requests -------------------------------------------------------------------------------

    async def complete(self, request: GenerationRequest) -> ReplicaResults | Refusal:
        """One whole generation: the results of its n samples, or the refusal the client gets."""
        try:
            await self._admit(request)
            results = await complete_all(self.engine, request)
        except Exception as exc:
            return self._refusal(exc)
        return ReplicaResults(results, self.replica_id)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StepOutput | Refusal]:
        """Yields a `StepOutput` per step with new text (the last of each of the n samples carries its result).

        The first item is a `Refusal` instead when the request is refused: the submission only
        happens when the first output is awaited, so the ingress learns the outcome (and can pick
        the HTTP status) with the first token. A failure mid-stream ends it with a `Refusal` too.
        """
        try:
            await self._admit(request)
            outputs = generate(self.engine, request)
            out = await outputs.__anext__()
        except Exception as exc:
            yield self._refusal(exc)
            return
        remaining = request.params.n  # the stream ends when each of its samples has finished
        try:
            while True:
                if out.finished:
                    yield out
                    remaining -= 1
                    if not remaining:
                        return
                elif out.delta or out.logprobs:
                    yield out
                out = await outputs.__anext__()
        except Exception as exc:  # the engine loop failed mid-stream: tell the client, in-band
            yield self._refusal(exc)
        finally:
            await outputs.aclose()  # aborts the request if the client went away

    async def _admit(self, request: GenerationRequest) -> None:
        if self.sync.changed():  # an admin change is visible to the very next request
            await asyncio.get_running_loop().run_in_executor(self._store_thread, self.sync.refresh)
        reason = self.sync.unservable.get(request.task_id)
        if reason is not None:
            raise UnservableTaskError(request.task_id, reason)

    def _refusal(self, exc: Exception) -> Refusal:
        refusal = refusal_for(exc, self.replica_id)
        if refusal is None:  # a bug, not the client's doing: let Serve report it
            raise exc
        return refusal

    # ---- introspection --------------------------------------------------------------------------

    def info(self) -> ReplicaInfo:
        options = self.backbone.options
        return ReplicaInfo(
            replica=self.replica_id, engine=self.engine.kind, backbone=self.backbone.name,
            hidden_size=self.backbone.hidden_size, dtype=options.dtype, quantization=options.quantization,
            device=str(self.backbone.device), max_input_tokens=self.settings.max_input_tokens,
            max_new_tokens=self.settings.max_new_tokens, registered_adapters=len(self.engine.registry),
            healthy=self.engine.healthy,
        )

    def check_health(self) -> None:
        """Called by Serve periodically; raising makes Serve replace this replica."""
        if not self.engine.healthy:
            raise RuntimeError("engine loop is not running")

    async def _poll_store(self) -> None:
        while True:
            await asyncio.sleep(STORE_POLL_S)
            try:
                # Off the event loop: on an object store the check itself is a (rate-limited) HEAD
                # request. Our own thread, not the loop's default executor, which Serve's shutdown
                # closes while this task may still be running.
                await asyncio.get_running_loop().run_in_executor(self._store_thread, self.sync.refresh_if_changed)
            except Exception:  # keep polling whatever happened; refresh logs its own problems
                log.exception("adapter store poll failed")

    def __del__(self):
        # Serve calls this on graceful shutdown: stop the engine thread before the process exits.
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(timeout=5.0)
