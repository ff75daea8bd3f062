"""The engine contract: what the serving layer, the `lamp` commands and the benches may use of
any engine (HF decoder, T5, vLLM), and the one async front each engine is driven through.

An engine is built by `build.build_engine` and wrapped by `build.build_runner`:

    engine = build_engine("hf", BackboneOptions(), EngineConfig())
    runner = build_runner(engine, max_waiting=64, on_step=..., on_finish=...)
    async for out in runner.generate(request): ...   # StepOutputs; the last carries the result
    result = await runner.complete(request)          # or the result alone
    runner.shutdown()

Both speak the request shape of lamp_runtime/requests.py and raise the errors of
lamp_runtime/errors.py, whatever the engine. tests/runtime/test_engine_contract.py runs one suite
of checks against every engine.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from ..adapters.registry import AdapterRegistry
from ..errors import EngineStoppedError, QueueFullError, require_at_least
from ..prompts.cache import CacheStats, PromptCache
from ..requests import GenerationRequest, GenerationResult, StepOutput
from .resident import ResidentAdapters


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 16
    max_input_tokens: int = 2048
    max_new_tokens: int = 1024
    prompt_cache_bytes: int = 256 * 1024 * 1024
    # Host memory for the factors of adapters registered by reference (adapters/stored.py), loaded
    # when a request needs them (engine/resident.py).
    adapter_cache_bytes: int = 64 * 1024 * 1024
    # Keys and values of tasks' soft prompts kept between requests (hf/prompt_kv.py); 0 = off.
    prompt_kv_cache_bytes: int = 256 * 1024 * 1024
    # A prefill forward's fixed cost in padded positions: newcomers whose lengths differ by more
    # than this (per row) are prefilled in separate forwards (see prefill_groups.py).
    prefill_forward_cost_tokens: int = 32
    # torch intra-op threads of the engine loop (None: the process's). See runner.py for why the
    # loop thread must be the only one that runs multi-threaded torch work.
    threads: int | None = None

    def __post_init__(self):
        require_at_least(self, 1, "max_batch_size", "max_input_tokens", "max_new_tokens", "prompt_cache_bytes",
                         "adapter_cache_bytes",
                         prefix="EngineConfig.")
        require_at_least(self, 0, "prompt_kv_cache_bytes", "prefill_forward_cost_tokens", prefix="EngineConfig.")
        require_at_least(self, 1, "threads", prefix="EngineConfig.")


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


@runtime_checkable
class Engine(Protocol):
    """Every engine: its backbone, its adapters and built prompts, its limits and its queue."""

    kind: str  # "hf" or "vllm": which runner drives it (build.build_runner)
    backbone: BackboneInfo
    registry: AdapterRegistry
    cache: PromptCache
    resident: ResidentAdapters  # factors of adapters registered by reference, loaded on demand
    config: EngineConfig
    last_step: StepStats

    @property
    def num_waiting(self) -> int:
        """Requests accepted but not yet prefilled."""

    @property
    def num_running(self) -> int:
        """Requests prefilled and still generating."""

    def has_work(self) -> bool: ...

    def abort(self, request_id: str) -> None:
        """Stop a request (its client went away); its slot and prompt pin are freed."""

    def discard(self, cache_key) -> None:
        """Forget what was built for an adapter version (re-registered or deleted)."""

    def prompt_kv_stats(self) -> CacheStats | None:
        """Reuse of tasks' soft-prompt keys/values (None: this engine keeps none)."""

    # Bytes of keys/values one context position holds in this engine's cache (all layers).
    kv_bytes_per_token: int

    def kv_cache_bytes(self) -> int | None:
        """Keys/values held by the requests in flight right now (None: the engine cannot tell)."""


class EngineRunner(abc.ABC):
    """The async front of an engine: submit, stream, abort on disconnect, bounded queue, stop."""

    def __init__(self, engine: Engine, max_waiting: int,
                 on_step: Callable[[StepStats], None] | None = None,
                 on_finish: Callable[[GenerationResult], None] | None = None):
        if max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {max_waiting}")
        self.engine = engine
        self.max_waiting = max_waiting
        self.on_step = on_step
        self.on_finish = on_finish

    @property
    @abc.abstractmethod
    def healthy(self) -> bool:
        """False once the engine loop stopped or failed: requests get EngineStoppedError."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[StepOutput]:
        """Submit `request` and yield its outputs; the last one carries the result.

        Validation errors (unknown task, bad parameters, input too long) raise before anything
        is queued; a full queue raises QueueFullError. If the consumer stops iterating (client
        gone), the request is aborted and its slot freed.
        """

    @abc.abstractmethod
    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine loop; requests still in flight end with EngineStoppedError."""

    async def complete(self, request: GenerationRequest) -> GenerationResult:
        """Non-streaming convenience: the final result only (the first sample's, with n > 1)."""
        return (await self.complete_all(request))[0]

    async def complete_all(self, request: GenerationRequest) -> list[GenerationResult]:
        """Non-streaming: the results of the request's n samples, in sample order."""
        results: dict[int, GenerationResult] = {}
        async for out in self.generate(request):
            if out.result is not None:
                results[out.result.index] = out.result
        if len(results) < request.params.n:
            raise EngineStoppedError("stream ended without a result")
        return [results[i] for i in sorted(results)]

    def check_admission(self) -> None:
        """Refuse at once when the engine is down or its queue is full (before any work)."""
        if not self.healthy:
            raise EngineStoppedError(f"engine loop is not running ({self.stopped_reason()})")
        waiting = self.engine.num_waiting
        if waiting >= self.max_waiting:
            raise QueueFullError(f"{waiting} requests already waiting (limit {self.max_waiting})")

    def stopped_reason(self) -> str:
        return "stopped"

    def _finished(self, result: GenerationResult) -> None:
        if self.on_finish is not None:
            self.on_finish(result)
