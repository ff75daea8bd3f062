"""The step loop (engine/step_loop.py) over a transformers core: concurrent async clients of
different tasks share its batches; the queue bound, unknown tasks and abandoned streams."""

import asyncio
import dataclasses

import pytest

from lamp_runtime.engine.base import EngineObserver
from lamp_runtime.engine.streams import complete, generate
from lamp_runtime.errors import QueueFullError, RequestError, UnknownTaskError
from lamp_runtime.hf.decoder import DecoderEngine
from lamp_runtime.hf.engine import HfEngine
from lamp_runtime.requests import GenerationRequest, SamplingParams

CASES = [("plain", "The capital of France is"), ("lamp2", "Write a haiku about the sea:"),
         ("lamp3", "1, 2, 3,"), ("lamp2", "Once upon a time")]


def requests():
    return [GenerationRequest(text, task, SamplingParams(max_new_tokens=8)) for task, text in CASES]


def looped(core: DecoderEngine, **config) -> HfEngine:
    """The core's backbone and registry in a new core with `config` changes, on a loop thread."""
    return HfEngine(DecoderEngine(core.backbone, registry=core.registry, config=dataclasses.replace(core.config,
                                                                                                     **config)))


def test_concurrent_clients_are_batched_across_tasks_and_match_alone(engine):
    alone = [engine.generate([r])[0].text for r in requests()]
    steps = []
    hf = looped(engine, batch_wait_ms=50)
    hf.observe(EngineObserver(on_step=steps.append))

    async def main():
        return await asyncio.gather(*(complete(hf, r) for r in requests()))

    try:
        results = asyncio.run(main())
    finally:
        hf.shutdown()
    assert [r.text for r in results] == alone
    assert max(s.distinct_tasks for s in steps) >= 3


def test_unknown_task_raises_before_queueing_and_queue_bound(engine):
    hf = looped(engine, max_waiting=1, batch_wait_ms=0)

    async def main():
        with pytest.raises(UnknownTaskError):
            await complete(hf, GenerationRequest("x", "missing"))
        hf.core.submit(GenerationRequest("fill the queue", "plain"))  # occupies the only waiting slot
        hf.core.submit(GenerationRequest("within its share", "lamp2"))  # the fair queue's reserve of 1
        hf._stopping = True  # freeze the loop so the slots stay taken
        with pytest.raises(QueueFullError, match="limit 2"):
            await complete(hf, GenerationRequest("x", "plain"))

    try:
        asyncio.run(main())
    finally:
        hf.shutdown()


def test_a_request_id_in_flight_is_refused_again(engine):
    hf = looped(engine, batch_wait_ms=0)
    request = GenerationRequest("Tell me a story", "lamp3", SamplingParams(max_new_tokens=50))

    async def main():
        stream = generate(hf, request)
        await stream.__anext__()
        with pytest.raises(RequestError, match="already in flight"):
            await complete(hf, request)
        await stream.aclose()

    try:
        asyncio.run(main())
    finally:
        hf.shutdown()


def test_abandoned_stream_aborts_its_request(engine):
    hf = looped(engine, batch_wait_ms=0)
    finished = []
    hf.observe(EngineObserver(on_finish=finished.append))

    async def main():
        stream = generate(hf, GenerationRequest("Tell me a story", "lamp3", SamplingParams(max_new_tokens=200)))
        await stream.__anext__()
        await stream.aclose()
        for _ in range(200):
            if not hf.core.has_work():
                return True
            await asyncio.sleep(0.01)
        return False

    try:
        assert asyncio.run(main())
        assert hf.stats().prompt_cache.pinned == 0
        assert [r.finish_reason for r in finished] == ["abort"]  # observers see it; the stream got nothing more
        assert not hf._sinks
    finally:
        hf.shutdown()
