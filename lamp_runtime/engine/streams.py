"""The one async adapter over any engine's `submit(request, sink)`: a request's outputs as an async
stream, for the serving replica, the benches and the tests alike.

The sink runs on the engine's thread and only hands each item to the caller's event loop; the
stream ends once each of the request's n samples has finished, and a consumer that stops
iterating (its client went away) aborts the request, freeing its slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from ..errors import EngineStoppedError
from ..requests import GenerationRequest, GenerationResult, StepOutput

if TYPE_CHECKING:  # no torch import: the serving ingress imports the replica module, which uses this
    from .base import Engine


async def generate(engine: Engine, request: GenerationRequest,
                   finished_only: bool = False) -> AsyncIterator[StepOutput]:
    """Submit `request` (when the first output is awaited) and yield its outputs; the last of each
    sample carries its result. Submission errors raise before anything is queued; an exception the
    engine sends ends the stream with that exception. `finished_only`: yield only each sample's
    last output, and wake the event loop for nothing else (a non-streaming request would
    otherwise wake it once per token, taking a core from the engine's threads at every step)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def sink(item: StepOutput | BaseException) -> None:
        if finished_only and not isinstance(item, BaseException) and not item.finished:
            return
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
            pass

    engine.submit(request, sink)
    remaining = request.params.n
    finished = False
    try:
        while not finished:
            item = await queue.get()
            if isinstance(item, BaseException):
                finished = True  # the engine already forgot the request
                raise item
            remaining -= item.finished
            finished = remaining == 0
            yield item
    finally:
        if not finished:
            engine.abort(request.request_id)


async def complete(engine: Engine, request: GenerationRequest) -> GenerationResult:
    """Non-streaming: the final result only (the first sample's, with n > 1)."""
    return (await complete_all(engine, request))[0]


async def complete_all(engine: Engine, request: GenerationRequest) -> list[GenerationResult]:
    """Non-streaming: the results of the request's n samples, in sample order."""
    results: dict[int, GenerationResult] = {}
    async for out in generate(engine, request, finished_only=True):
        if out.result is not None:
            results[out.result.index] = out.result
    if len(results) < request.params.n:
        raise EngineStoppedError("stream ended without a result")
    return [results[i] for i in sorted(results)]
