"""Ingress side of inference: `/generate` and OpenAI `/v1/completions` over the model deployment
(OpenAI chat completions: chat_completions.py, over the same calls).

Each HTTP request converts itself into `GenerationRequest`s (one per prompt for a list of OpenAI
prompts, issued together so they join the same batch), and each becomes one call on the model
deployment handle, which answers with `ReplicaResults` (its n samples' results and the replica) or a `Refusal`. Streams use a
streaming handle call; the first item is awaited before the response starts, so a refused request
gets a proper status code instead of a 200 stream that carries an error.

The answer is typed: a `Reply` (a JSON body and the replicas that answered) or an `EventStream`
(server-sent events); only the router (serving/ingress.py) turns them into HTTP responses.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from lamp_runtime.errors import RequestError
from lamp_runtime.requests import GenerationRequest, StepOutput

from .http.errors import REPLICA_HEADER, ServingError
from .http.logprobs import CompletionLogprobs
from .http.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionUsage,
    GenerateRequest,
    GenerateResponse,
    GenerateStreamEvent,
    completion_id,
    openai_finish,
)
from .metrics.ingress import IngressMetrics
from .transport import RETRY_AFTER_S, Refusal, ReplicaResults

log = logging.getLogger(__name__)

# A request whose replica died before answering (its node was lost, the process was killed) is
# sent again, to whichever replica the handle picks: generation has no side effects, and a greedy
# or seeded request answers the same anywhere. A stream is retried only before its first item.
REPLICA_LOST_RETRIES = 2


@dataclass(frozen=True)
class Reply:
    """A whole answer: its JSON body and the replicas that answered (a response header)."""

    body: dict
    replicas: str | None = None


@dataclass(frozen=True)
class EventStream:
    """A streamed answer: server-sent events, the first item already received."""

    events: AsyncIterator[str]


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


def translate_handle_error(exc: BaseException) -> ServingError:
    """Failures of the handle call itself (not errors the replica reported)."""
    if isinstance(exc, BackPressureError):
        return ServingError(503, f"server overloaded: too many queued requests; retry after {RETRY_AFTER_S} s",
                            {"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, (RayActorError, DeploymentUnavailableError)):
        return ServingError(503, "model replica unavailable, retry shortly", {"Retry-After": str(RETRY_AFTER_S)})
    log.error("model replica call failed: %s", exc if isinstance(exc, RayTaskError) else repr(exc))
    return ServingError(500, "internal error in the model replica (details in the server log)")


def cancel_quietly(response) -> None:
    """Cancel a handle call that may already have failed.

    Serve's `DeploymentResponse.cancel()` re-raises the call's own error when the call has already
    failed (e.g. BackPressureError for a call rejected by a full queue). Escaping the route, that
    error became Serve's plain-text 503 instead of our JSON error for the request.
    """
    try:
        response.cancel()
    except Exception:
        pass


class GenerationService:
    def __init__(self, model, metrics: IngressMetrics):
        self.model = model
        self.metrics = metrics

    # ---- /generate --------------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> Reply | EventStream:
        engine_request = self.to_engine(request.task_id, request.to_engine)
        if request.stream:
            first, items = await self.open_stream(engine_request)
            return EventStream(self._generate_events(request.task_id, first, items))
        answer = await self.complete(engine_request)
        (result,) = answer.results
        return Reply(GenerateResponse.from_result(result).model_dump(), answer.replica)

    async def _generate_events(self, task_id: str, first: StepOutput, items) -> AsyncIterator[str]:
        async for item in self.relay(first, items):
            if isinstance(item, Refusal):
                yield sse({"error": public(item)})
                return
            if item.result is None:
                yield sse(GenerateStreamEvent(task_id=task_id, delta=item.delta).model_dump(exclude_none=True))
                continue
            final = GenerateResponse.from_result(item.result)
            yield sse(GenerateStreamEvent(task_id=task_id, delta=item.delta, finish_reason=final.finish_reason,
                                          adapter_version=final.adapter_version, usage=final.usage,
                                          timings_ms=final.timings_ms).model_dump())
        yield sse("[DONE]")

    # ---- /v1/completions --------------------------------------------------------------------------

    async def completions(self, request: CompletionRequest) -> Reply | EventStream:
        engine_requests = self.to_engine(request.model, request.to_engine)
        if request.stream:
            if len(engine_requests) != 1:
                self._count_invalid(request.model)
                raise ServingError(422, f"stream=true supports a single prompt, got {len(engine_requests)}")
            first, items = await self.open_stream(engine_requests[0])
            return EventStream(self._completion_chunks(request, first, items))
        per_prompt = await self.complete_many(request.model, engine_requests)
        choices = [request.choice(p * request.n + r.index, prompt, r)
                   for p, (prompt, answer) in enumerate(zip(request.prompts, per_prompt)) for r in answer.results]
        results = [r for answer in per_prompt for r in answer.results]
        body = CompletionResponse(id=completion_id(), model=request.model, choices=choices,
                                  usage=CompletionUsage.of(results))
        return Reply(body.model_dump(), replicas_of(per_prompt))

    async def _completion_chunks(self, request: CompletionRequest, first: StepOutput, items) -> AsyncIterator[str]:
        chunk_id = completion_id()
        header = CompletionResponse(id=chunk_id, model=request.model, choices=[]).model_dump(
            exclude={"choices", "usage"})
        results = []
        async for item in self.relay(first, items):
            if isinstance(item, Refusal):
                yield sse({"error": public(item)})
                return
            result = item.result
            logprobs = CompletionLogprobs.of(item.logprobs) if request.logprobs is not None else None
            choice = CompletionChoice(index=item.index, text=item.delta, logprobs=logprobs,
                                      finish_reason=openai_finish(result.finish_reason) if result else None)
            yield sse({**header, "choices": [choice.model_dump()]})
            if result is not None:
                results.append(result)
        if request.stream_options and request.stream_options.include_usage:
            yield sse({**header, "choices": [], "usage": CompletionUsage.of(results).model_dump()})
        yield sse("[DONE]")

    # ---- calls on the model deployment ------------------------------------------------------------

    def to_engine(self, task_id: str, convert):
        """The request's engine form; a value only SamplingParams checks is a 422 here, at the ingress."""
        try:
            return convert()
        except RequestError as exc:
            self._count_invalid(task_id)
            raise ServingError(422, f"invalid request: {exc}") from None

    async def complete(self, request: GenerationRequest) -> ReplicaResults:
        """The results of the request's n samples, and the replica that produced them."""
        return (await self.complete_many(request.task_id, [request]))[0]

    async def complete_many(self, task_id: str, requests: list[GenerationRequest]) -> list[ReplicaResults]:
        calls = [asyncio.ensure_future(self._call(request)) for request in requests]
        try:
            replies = await asyncio.gather(*calls)
        except Exception as exc:
            for call in calls:
                call.cancel()
            error = translate_handle_error(exc)
            self._count(task_id, error.status)
            raise error from None
        refusals = [r for r in replies if isinstance(r, Refusal)]
        if refusals:
            self._refused(task_id, refusals[0])
        self._count(task_id, 200)
        return replies

    def _handle(self, request: GenerationRequest, **options):
        """The model handle for this request: the task id travels as Serve's `session_id`, which the
        task-affinity router reads (serving/routing/router.py) without deserializing the request."""
        return self.model.options(session_id=request.task_id, **options)

    async def _call(self, request: GenerationRequest) -> ReplicaResults | Refusal:
        """One call on the model deployment, re-sent if its replica dies before answering."""
        retries = REPLICA_LOST_RETRIES
        while True:
            call = self._handle(request).complete.remote(request)  # BackPressureError when the queue is full
            try:
                return await call
            except RayActorError as exc:
                if not retries:
                    raise
                retries -= 1
                log.warning("replica lost while serving request %s (%s); sending it again",
                            request.request_id, exc.__class__.__name__)
            except asyncio.CancelledError:
                cancel_quietly(call)
                raise

    async def open_stream(self, request: GenerationRequest):
        for attempt in range(REPLICA_LOST_RETRIES + 1):
            items = None
            try:
                items = self._handle(request, stream=True).stream.remote(request)
                first = await items.__anext__()
                break
            except Exception as exc:
                if items is not None:
                    cancel_quietly(items)
                if isinstance(exc, RayActorError) and attempt < REPLICA_LOST_RETRIES:
                    log.warning("replica lost before streaming request %s; sending it again", request.request_id)
                    continue
                error = translate_handle_error(exc)
                self._count(request.task_id, error.status)
                raise error from None
        if isinstance(first, Refusal):
            self._refused(request.task_id, first)
        self._count(request.task_id, 200)
        return first, items

    def _count(self, task_id: str, status: int) -> None:
        """A request the model deployment took (answered, refused, or the call failed): its task
        keeps its own metric label unless a replica did not know it (404)."""
        self.metrics.count_request(task_id, status != 404, status)

    def _count_invalid(self, task_id: str) -> None:
        """A request refused here (422) before any replica saw it: an id nobody checked takes none
        of the bounded task labels."""
        self.metrics.count_request(task_id, False, 422)

    def _refused(self, task_id: str, refusal: Refusal):
        self._count(task_id, refusal.status)
        raise refused(refusal)

    @staticmethod
    async def relay(first: StepOutput, items) -> AsyncIterator[StepOutput | Refusal]:
        """The stream's items, first included; a replica lost mid-stream becomes an in-band refusal."""
        finished = False
        try:
            yield first
            async for item in items:
                yield item
            finished = True
        except Exception as exc:
            error = translate_handle_error(exc)
            yield Refusal(error.status, error.message)
            finished = True
        finally:
            if not finished:  # the client went away: stop generating for it
                cancel_quietly(items)


def refused(refusal: Refusal) -> ServingError:
    """The HTTP error for a replica's refusal; says which replica answered (header), like successes do."""
    headers = {"Retry-After": str(RETRY_AFTER_S)} if refusal.status in (429, 503) else {}
    if refusal.replica:
        headers[REPLICA_HEADER] = refusal.replica
    return ServingError(refusal.status, refusal.message, headers)


def public(refusal: Refusal) -> dict:
    """An in-band stream error, in the same shape as an error response body."""
    return {"message": refusal.message, "code": refusal.status}


def replicas_of(answers: list[ReplicaResults]) -> str:
    """The replicas that answered, for the response header (once each, in order)."""
    return ",".join(dict.fromkeys(a.replica for a in answers if a.replica))
