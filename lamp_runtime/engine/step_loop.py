"""`StepLoopEngine`: the engine contract over a synchronous step core, driven by one loop thread.

A step core (the transformers engines of lamp_runtime/hf/, the llama.cpp engine) queues requests
with `submit(request)` from any thread and runs one `step()` at a time: prefill what joined, one
token for every running row. This module owns the thread that calls `step()` while there is work,
hands each output to its request's sink and the observers, and fails every request in flight if
the core raises (the loop never dies silently; `healthy` turns False). Every request that arrives
while the loop runs joins the same continuous batch, whatever its task; the waiting queue is
bounded by `config.max_waiting` (plus, with fair scheduling, the reserve of fair_queue.py, which
the core's FairQueue applies per task).

Threads: the core's `on_loop_start()` runs on the loop thread before its first step; the
transformers cores set torch's intra-op threads there, and the loop thread should be the only
thread of the process that ever runs multi-threaded torch work. torch's OpenMP runtime (libgomp)
keeps one worker pool per thread that starts a parallel region, and once the pools hold more
threads than there are cores it stops spin-waiting between regions: every region then pays a
wake-up (measured in lamp_runtime/bench/threads.py; docs/benchmarks.md). So load the backbone
with one thread (`torch.set_num_threads(1)`, as the serving replica does) and let the loop set the
engine's count.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

from ..adapters.registry import AdapterRegistry
from ..errors import EngineStoppedError, RequestError
from ..requests import GenerationRequest, StepOutput
from .base import BackboneInfo, Engine, EngineConfig, EngineStats, Sink, StepStats
from .fair_queue import TaskLimits, queue_limit

log = logging.getLogger(__name__)


class StepCore(Protocol):
    """What a step core offers its loop. `submit`, `abort`, `stats`, `discard` and the counts may
    be called from any thread; `on_loop_start` and `step` only from the loop thread."""

    kind: str
    backbone: BackboneInfo
    registry: AdapterRegistry
    config: EngineConfig
    kv_bytes_per_token: int
    last_step: StepStats  # what the last step did

    @property
    def num_waiting(self) -> int: ...

    @property
    def num_running(self) -> int: ...

    def submit(self, request: GenerationRequest) -> object:
        """Validate and queue; raise before queueing anything."""

    def step(self) -> list[StepOutput]: ...

    def has_work(self) -> bool: ...

    def abort(self, request_id: str) -> None: ...

    def discard(self, cache_key) -> None: ...

    def stats(self) -> EngineStats: ...

    def set_task_limits(self, task_id: str, limits: TaskLimits) -> None: ...

    def on_loop_start(self) -> None:
        """Per-thread setup (e.g. torch's intra-op threads), on the loop thread."""


class StepLoopEngine(Engine):
    def __init__(self, core: StepCore):
        super().__init__()
        self.core = core
        self.kind = core.kind
        self.backbone = core.backbone
        self.registry = core.registry
        self.config = core.config
        self.kv_bytes_per_token = core.kv_bytes_per_token
        self.batch_wait = core.config.batch_wait_ms / 1000
        self._sinks: dict[str, tuple[Sink, int]] = {}  # request id -> (sink, samples not finished)
        self._sinks_lock = threading.Lock()
        self._wakeup = threading.Event()
        self._stopping = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"lamp-{core.kind}-loop", daemon=True)
        self._thread.start()

    # ---- the contract (any thread) -----------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and self._error is None

    def stopped_reason(self) -> str:
        return str(self._error or "stopped")

    def submit(self, request: GenerationRequest, sink: Sink) -> None:
        self._check_admission(self.core.num_waiting, queue_limit(self.config))
        with self._sinks_lock:
            if request.request_id in self._sinks:
                raise RequestError(f"request id {request.request_id!r} is already in flight")
            self._sinks[request.request_id] = (sink, request.params.n)
        try:
            if self._stopping:  # shut down after our admission check: its sinks were already failed
                raise EngineStoppedError("engine loop is not running (stopped)")
            self.core.submit(request)
        except BaseException:
            with self._sinks_lock:
                self._sinks.pop(request.request_id, None)
            raise
        self._wakeup.set()

    def abort(self, request_id: str) -> None:
        with self._sinks_lock:
            self._sinks.pop(request_id, None)
        self.core.abort(request_id)
        self._wakeup.set()

    def stats(self) -> EngineStats:
        return self.core.stats()

    def discard(self, cache_key) -> None:
        self.core.discard(cache_key)

    def set_task_limits(self, task_id: str, limits: TaskLimits) -> bool:
        self.core.set_task_limits(task_id, limits)
        return True

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wakeup.set()
        self._thread.join(timeout)

    # ---- the loop thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.core.on_loop_start()
            self._loop()
        except BaseException as exc:  # the loop must never die silently: fail every request in flight
            log.exception("engine loop failed")
            self._error = exc
            self._fail_all(EngineStoppedError(f"engine loop failed: {exc!r}"))
        else:
            self._fail_all(EngineStoppedError("engine shut down before the request finished"))

    def _loop(self) -> None:
        core = self.core
        while not self._stopping:
            if not core.has_work():
                self._wakeup.wait(timeout=0.5)
                self._wakeup.clear()
                if core.has_work() and core.num_running == 0 and self.batch_wait:
                    # Idle -> busy: give requests arriving together a moment to share one prefill.
                    deadline = time.perf_counter() + self.batch_wait
                    while time.perf_counter() < deadline and core.num_waiting < self.config.max_batch_size:
                        time.sleep(0.001)
                continue
            outputs = core.step()
            self._report_step(core.last_step)
            for out in outputs:
                self._deliver(out)

    def _deliver(self, out: StepOutput) -> None:
        if out.result is not None:
            self._report_finish(out.result)
        with self._sinks_lock:
            sink, remaining = self._sinks.get(out.request_id, (None, 0))
            if sink is not None and out.finished:
                if remaining > 1:
                    self._sinks[out.request_id] = (sink, remaining - 1)
                else:  # its last sample: the request is done
                    del self._sinks[out.request_id]
        if sink is not None:
            self._send(sink, out)

    def _fail_all(self, exc: EngineStoppedError) -> None:
        with self._sinks_lock:
            sinks, self._sinks = [sink for sink, _ in self._sinks.values()], {}
        for sink in sinks:
            self._send(sink, exc)

    @staticmethod
    def _send(sink: Sink, item) -> None:
        try:
            sink(item)
        except Exception:  # one caller's broken sink must not stop the batch of everyone else
            log.exception("a request's sink failed")
