"""The engine contract: what the serving layer, the `lamp` commands and the benches may use of
any engine (HF decoder, T5, vLLM, llama.cpp), whatever drives it inside.

An engine is built by `lamp_runtime.engines.build_engine` and used through `submit` with a sink,
or through the async adapter of streams.py that every engine shares:

    engine = build_engine("hf", BackboneOptions(), EngineConfig(max_waiting=64),
                          observer=EngineObserver(on_step=..., on_finish=...))
    async for out in generate(engine, request): ...   # StepOutputs; the last carries the result
    result = await complete(engine, request)          # or the result alone
    engine.stats()                                     # EngineStats: what /metrics and /status show
    engine.shutdown()

Every engine speaks the request shape of lamp_runtime/requests.py and raises the errors of
lamp_runtime/errors.py. tests/runtime/test_engine_contract.py runs one suite of checks against
every engine.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from ..adapters.registry import AdapterRegistry
from ..errors import EngineStoppedError, QueueFullError, require_at_least
from ..prompts.cache import CacheStats
from ..requests import (
    MAX_INPUT_TOKENS_LIMIT,
    MAX_NEW_TOKENS_LIMIT,
    GenerationRequest,
    GenerationResult,
    StepOutput,
)
from .fair_queue import TaskLimits, TaskQueueStats

# What an engine hands a request's sink: each of its outputs, or one exception that ends it.
Sink = Callable[[StepOutput | BaseException], None]


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 16
    max_input_tokens: int = MAX_INPUT_TOKENS_LIMIT
    max_new_tokens: int = MAX_NEW_TOKENS_LIMIT
    prompt_cache_bytes: int = 256 * 1024 * 1024
    # Host memory for the factors of adapters registered by reference (adapters/stored.py), loaded
    # when a request needs them (engine/resident.py).
    adapter_cache_bytes: int = 64 * 1024 * 1024
    # Keys and values of tasks' soft prompts kept between requests (hf/prompt_kv.py); 0 = off.
    prompt_kv_cache_bytes: int = 256 * 1024 * 1024
    # A prefill forward's fixed cost in padded positions: newcomers whose lengths differ by more
    # than this (per row) are prefilled in separate forwards (see prefill_groups.py).
    prefill_forward_cost_tokens: int = 32
    # torch intra-op threads of the engine loop (None: the process's). See step_loop.py for why the
    # loop thread must be the only one that runs multi-threaded torch work.
    threads: int | None = None
    # Requests accepted but not yet prefilled, at most; beyond it `submit` raises QueueFullError
    # (the HTTP layer answers 503 + Retry-After) rather than letting latency and memory grow.
    # With fair scheduling, a task alone may fill it; past it a task beyond its share gets
    # TaskQueueFullError (429) and tasks within theirs get in, up to a reserve (fair_queue.py).
    max_waiting: int = 256
    # Step cores admit waiting requests by a virtual token counter per task and bound each task's
    # share of the queue (engine/fair_queue.py); False: first come, first served across tasks.
    fair_scheduling: bool = True
    # With fair scheduling: a waiting request of a task below its share of the batch rows enters
    # at the next step, pausing a row of the task most over its share (its keys/values kept; it
    # resumes later with the same answer) instead of waiting for a row to free (fair_queue.py).
    # Only cores that can pause a row do it (the Llama-template decoder core, the llama.cpp core);
    # the others ignore it.
    fair_preemption: bool = True
    # Step-loop engines (step_loop.py): when the engine goes from idle to busy, how long to wait
    # for requests arriving together so they share one prefill. vLLM forms its batches itself.
    batch_wait_ms: float = 5.0

    def __post_init__(self):
        require_at_least(self, 1, "max_batch_size", "max_input_tokens", "max_new_tokens", "prompt_cache_bytes",
                         "adapter_cache_bytes", "max_waiting",
                         prefix="EngineConfig.")
        require_at_least(self, 0, "prompt_kv_cache_bytes", "prefill_forward_cost_tokens", prefix="EngineConfig.")
        require_at_least(self, 1, "threads", prefix="EngineConfig.")
        if not isinstance(self.batch_wait_ms, (int, float)) or self.batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms}")
        for name in ("fair_scheduling", "fair_preemption"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")


@dataclass
class StepStats:
    """What the last step did; the serving layer turns these into metrics."""

    batch_size: int = 0
    distinct_tasks: int = 0
    prefilled: int = 0
    prefill_tokens: int = 0
    prefill_forwards: int = 0
    prefill_padding: int = 0  # padded positions computed beyond the real tokens
    prompt_kv_hits: int = 0  # newcomers whose soft prompt's keys/values were reused, not computed
    prompt_tokens_reused: int = 0  # soft-prompt positions those newcomers did not compute
    # Positions the step's forwards ran (prefill rows, prompt-KV builds, one per decode row, no
    # padding): the x of the serving layer's per-token cost fit.
    computed_tokens: int = 0
    seconds: float = 0.0


class BackboneInfo(Protocol):
    """What an engine tells about its backbone (the transformers `Backbone` and vLLM's)."""

    name: str
    options: object  # resolved BackboneOptions
    tokenizer: object

    @property
    def hidden_size(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def weights_bytes(self) -> int: ...

    @property
    def max_positions(self) -> int: ...


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of an engine, read when /metrics or /status.json is collected.

    prompt_kv: reuse of tasks' soft-prompt keys/values (None: the engine keeps none), counted in
      `prompt_kv_unit`: whole requests (the HF decoder's prompt-KV cache) or prompt tokens (a
      block-granular prefix cache such as vLLM's). A cache of whole prompts (the HF decoder's, llama.cpp's) gives a
      PromptKVStats (prompts/prompt_kv.py): also its lookups by task and the bytes pooling saves.
    kv_cache_bytes: keys/values held by the requests in flight (None: the engine cannot tell).
    settings: what the engine chose for itself (e.g. a probed weight layout), shown as labels of
      `lamp_engine_info` on /metrics; keys are label names.
    tasks: each task's part of the waiting queue (waiting now; admitted, refused by reason, tokens
      served since the start), for the tasks seen; empty for an engine without a fair queue.
    """

    kind: str
    waiting: int
    running: int
    prompt_cache: CacheStats
    adapter_cache: CacheStats
    backbone_bytes: int
    device: str
    prompt_kv: CacheStats | None = None
    prompt_kv_unit: Literal["requests", "prompt tokens"] = "requests"
    kv_cache_bytes: int | None = None
    cuda_allocated_bytes: int | None = None  # None off CUDA
    cuda_reserved_bytes: int | None = None
    settings: dict[str, str] = field(default_factory=dict)
    compute_threads: int | None = None  # threads the engine computes with now (None: not reported)
    tasks: dict[str, TaskQueueStats] = field(default_factory=dict)

    def __post_init__(self):
        if self.prompt_kv_unit not in ("requests", "prompt tokens"):
            raise ValueError(f"prompt_kv_unit must be 'requests' or 'prompt tokens', got {self.prompt_kv_unit!r}")
        for key, value in self.settings.items():
            if not key.isidentifier() or key in ("kind", "device") or not isinstance(value, str):
                raise ValueError(f"engine setting {key!r}={value!r}: keys are label names other than kind and "
                                 "device, values strings")


def device_memory(device: torch.device | str) -> tuple[int | None, int | None]:
    """(allocated, reserved) bytes of torch's CUDA allocator on `device`; (None, None) elsewhere."""
    device = torch.device(device)
    if device.type != "cuda":
        return None, None
    return torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)


@dataclass(frozen=True)
class EngineObserver:
    """What the serving layer measures: called on the engine's thread after every step, and once
    per finished sample (aborted ones included, with finish_reason "abort")."""

    on_step: Callable[[StepStats], None] | None = None
    on_finish: Callable[[GenerationResult], None] | None = None


class Engine(abc.ABC):
    """Every engine: its backbone, its adapters, its limits, its queue and what it reports.

    Subclasses call `super().__init__()` and report through `_report_step` / `_report_finish`.
    """

    kind: str  # "hf", "vllm", ...: the `--engine` name it is built by (lamp_runtime/engines/)
    backbone: BackboneInfo
    registry: AdapterRegistry
    config: EngineConfig
    # Bytes of keys/values one context position holds in this engine's cache (all layers).
    kv_bytes_per_token: int

    def __init__(self):
        self._observers: list[EngineObserver] = []

    @abc.abstractmethod
    def submit(self, request: GenerationRequest, sink: Sink) -> None:
        """Validate and queue `request`; then `sink` receives each of its StepOutputs (the last of
        each of its n samples has `finished` and carries the result), or one exception that ends
        the request. `sink` is called on the engine's thread and must not block.

        Raises before anything is queued: RequestError and its kinds (unknown task, input too long,
        unsupported parameters), QueueFullError beyond `config.max_waiting`, EngineStoppedError.
        """

    @abc.abstractmethod
    def abort(self, request_id: str) -> None:
        """Stop a request (its client went away); its slot and prompt pin are freed and its sink
        gets nothing more. Observers still see its result (finish_reason "abort")."""

    @property
    @abc.abstractmethod
    def healthy(self) -> bool:
        """False once the engine stopped or failed: requests get EngineStoppedError."""

    def stopped_reason(self) -> str:
        return "stopped"

    @abc.abstractmethod
    def stats(self) -> EngineStats:
        """A snapshot of the queue, caches and memory (any thread)."""

    @abc.abstractmethod
    def discard(self, cache_key) -> None:
        """Forget what was built for an adapter version (re-registered or deleted); a request still
        running on it keeps it until it finishes."""

    @abc.abstractmethod
    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine; requests in flight end with EngineStoppedError. Idempotent."""

    def set_task_limits(self, task_id: str, limits: TaskLimits) -> bool:
        """Apply an operator's weight and queue limit for a task (engine/fair_queue.py); False: this
        engine has no fair queue to apply them to (vLLM admits first come, first served)."""
        return False

    def observe(self, observer: EngineObserver) -> None:
        """Add an observer (call before submitting: steps already run are not replayed)."""
        self._observers.append(observer)

    def _report_step(self, stats: StepStats) -> None:
        for observer in self._observers:
            if observer.on_step is not None:
                observer.on_step(stats)

    def _report_finish(self, result: GenerationResult) -> None:
        for observer in self._observers:
            if observer.on_finish is not None:
                observer.on_finish(result)

    def _check_admission(self, waiting: int, limit: int | None = None) -> None:
        """Refuse at once when the engine is down or its queue is full (before any work); `limit`:
        the queue's bound when not `config.max_waiting` (a fair queue's reserve included)."""
        if not self.healthy:
            raise EngineStoppedError(f"engine loop is not running ({self.stopped_reason()})")
        limit = self.config.max_waiting if limit is None else limit
        if waiting >= limit:
            raise QueueFullError(f"{waiting} requests already waiting (limit {limit})")
