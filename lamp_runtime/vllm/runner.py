"""The async front of a `VllmEngine`, the vLLM counterpart of AsyncEngine (same EngineRunner base).

vLLM forms its own batches at every step, so there is no `batch_wait_ms` here: a request joins
the running batch at vLLM's next step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from ..engine.base import EngineRunner, StepStats
from ..requests import GenerationRequest, GenerationResult, StepOutput
from .engine import SHUTDOWN_TIMEOUT_S, VllmEngine


class VllmRunner(EngineRunner):
    def __init__(self, engine: VllmEngine, max_waiting: int = 256,
                 on_step: Callable[[StepStats], None] | None = None,
                 on_finish: Callable[[GenerationResult], None] | None = None):
        super().__init__(engine, max_waiting, on_step, on_finish)
        engine.step_callback = self._step
        engine.finish_callback = self._finished

    def _step(self, stats: StepStats) -> None:
        if self.on_step is not None:
            self.on_step(stats)

    @property
    def healthy(self) -> bool:
        return self.engine.healthy

    def stopped_reason(self) -> str:
        return "vLLM engine stopped"

    async def generate(self, request: GenerationRequest) -> AsyncIterator[StepOutput]:
        self.check_admission()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the caller's loop is closed: nobody is listening any more
                pass

        self.engine.start(request, sink)
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine already forgot the request
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.engine.abort(request.request_id)

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        self.engine.shutdown(timeout)
