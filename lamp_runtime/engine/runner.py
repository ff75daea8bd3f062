"""Drive a transformers engine from a background thread and hand each request its outputs as an
async stream.

The serving layer awaits `generate(request)`; every request that arrives while the loop runs joins
the same continuous batch, whatever its task. The waiting queue is bounded: beyond `max_waiting`
queued requests `QueueFullError` is raised at once (the HTTP layer answers 503 + Retry-After)
rather than letting latency and memory grow without limit.

Threads: the loop thread runs the engine's steps with `engine.threads` intra-op threads, and should
be the only thread of the process that ever runs multi-threaded torch work. torch's OpenMP
runtime (libgomp) keeps one worker pool per thread that starts a parallel region, and once the
pools hold more threads than there are cores it stops spin-waiting between regions: every region
then pays a wake-up. Measured on the 2-core CPU, one int4 product: 17 us in the loop thread alone,
56 us once the loading thread had also used 2 threads; int4 SmolLM2 decoded a token in 20 ms
instead of 7.5. So load the backbone with one thread (`torch.set_num_threads(1)`, as the serving
replica does) and let this loop set the engine's count.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable

import torch

from ..errors import EngineStoppedError
from ..requests import GenerationRequest, GenerationResult, StepOutput
from .base import EngineRunner, StepStats
from ..hf.step_engine import StepEngine

log = logging.getLogger(__name__)


class AsyncEngine(EngineRunner):
    def __init__(self, engine: StepEngine, max_waiting: int = 256, batch_wait_ms: float = 5.0,
                 on_step: Callable[[StepStats], None] | None = None,
                 on_finish: Callable[[GenerationResult], None] | None = None):
        if batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {batch_wait_ms}")
        super().__init__(engine, max_waiting, on_step, on_finish)
        self.batch_wait = batch_wait_ms / 1000
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._streams_lock = threading.Lock()
        self._wakeup = threading.Event()
        self._stopping = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="lamp-engine-loop", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and self._error is None

    def stopped_reason(self) -> str:
        return str(self._error or "stopped")

    async def generate(self, request: GenerationRequest) -> AsyncIterator[StepOutput]:
        self.check_admission()
        queue: asyncio.Queue = asyncio.Queue()
        with self._streams_lock:
            self._streams[request.request_id] = (asyncio.get_running_loop(), queue)
        try:
            if self._stopping:  # shut down after our admission check: its streams were already failed
                raise EngineStoppedError("engine loop is not running (stopped)")
            self.engine.submit(request)
        except BaseException:
            with self._streams_lock:
                self._streams.pop(request.request_id, None)
            raise
        self._wakeup.set()
        remaining = request.params.n  # the stream ends once each of the n samples has finished
        finished = False
        try:
            while not finished:
                out = await queue.get()
                if isinstance(out, EngineStoppedError):
                    raise out
                if isinstance(out, BaseException):
                    raise EngineStoppedError(f"engine loop failed: {out!r}")
                remaining -= out.finished
                finished = remaining == 0
                yield out
        finally:
            with self._streams_lock:
                self._streams.pop(request.request_id, None)
            if not finished:
                self.engine.abort(request.request_id)
                self._wakeup.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wakeup.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            torch.set_num_threads(self.engine.threads)  # this thread's OpenMP pool (see the module docstring)
            self._loop()
        except BaseException as exc:  # the loop must never die silently: fail every waiting stream
            log.exception("engine loop failed")
            self._error = exc
            self._fail_streams(exc)
        else:
            self._fail_streams(EngineStoppedError("engine shut down before the request finished"))

    def _loop(self) -> None:
        while not self._stopping:
            if not self.engine.has_work():
                self._wakeup.wait(timeout=0.5)
                self._wakeup.clear()
                if self.engine.has_work() and self.engine.num_running == 0 and self.batch_wait:
                    # Idle -> busy: give requests arriving together a moment to share one prefill.
                    deadline = time.perf_counter() + self.batch_wait
                    while (time.perf_counter() < deadline
                           and self.engine.num_waiting < self.engine.config.max_batch_size):
                        time.sleep(0.001)
                continue
            outputs = self.engine.step()
            if self.on_step is not None:
                self.on_step(self.engine.last_step)
            for out in outputs:
                self._deliver(out)

    def _fail_streams(self, exc: BaseException) -> None:
        with self._streams_lock:
            streams = list(self._streams.values())
        for loop, queue in streams:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            except RuntimeError:  # that caller's event loop is closed: nobody is listening
                pass

    def _deliver(self, out: StepOutput) -> None:
        if out.result is not None:
            self._finished(out.result)
        with self._streams_lock:
            target = self._streams.get(out.request_id)
        if target is not None:
            loop, queue = target
            loop.call_soon_threadsafe(queue.put_nowait, out)
