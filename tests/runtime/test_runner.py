"""Concurrent async clients of different tasks share the engine loop's batches."""

import asyncio

import pytest

from lamp_runtime.engine.runner import AsyncEngine
from lamp_runtime.errors import QueueFullError, UnknownTaskError
from lamp_runtime.requests import GenerationRequest, SamplingParams

CASES = [("plain", "The capital of France is"), ("lamp2", "Write a haiku about the sea:"),
         ("lamp3", "1, 2, 3,"), ("lamp2", "Once upon a time")]


def requests():
    return [GenerationRequest(text, task, SamplingParams(max_new_tokens=8)) for task, text in CASES]


def test_concurrent_clients_are_batched_across_tasks_and_match_alone(engine):
    alone = [engine.generate([r])[0].text for r in requests()]
    steps = []
    runner = AsyncEngine(engine, batch_wait_ms=50, on_step=steps.append)

    async def main():
        return await asyncio.gather(*(runner.complete(r) for r in requests()))

    try:
        results = asyncio.run(main())
    finally:
        runner.shutdown()
    assert [r.text for r in results] == alone
    assert max(s.distinct_tasks for s in steps) >= 3


def test_unknown_task_raises_before_queueing_and_queue_bound(engine):
    runner = AsyncEngine(engine, max_waiting=1, batch_wait_ms=0)

    async def main():
        with pytest.raises(UnknownTaskError):
            await runner.complete(GenerationRequest("x", "missing"))
        engine.submit(GenerationRequest("fill the queue", "plain"))  # occupies the only waiting slot
        runner._stopping = True  # freeze the loop so the slot stays taken
        with pytest.raises(QueueFullError, match="limit 1"):
            await runner.complete(GenerationRequest("x", "plain"))

    try:
        asyncio.run(main())
    finally:
        runner.shutdown()


def test_abandoned_stream_aborts_its_request(engine):
    runner = AsyncEngine(engine, batch_wait_ms=0)

    async def main():
        stream = runner.generate(GenerationRequest("Tell me a story", "lamp3", SamplingParams(max_new_tokens=200)))
        await stream.__anext__()
        await stream.aclose()
        for _ in range(200):
            if not engine.has_work():
                return True
            await asyncio.sleep(0.01)
        return False

    try:
        assert asyncio.run(main())
        assert engine.cache.stats().pinned == 0
    finally:
        runner.shutdown()
