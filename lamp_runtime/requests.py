"""The one request shape: what a caller asks of an engine and what it gets back.

These dataclasses cross every boundary unchanged: the HTTP schemas convert themselves into a
`GenerationRequest`, the Ray Serve replica passes it to its engine and returns the engine's
`StepOutput`s / `GenerationResult` to the ingress (they pickle as they are), and every engine
(HF decoder, T5, vLLM) takes and returns them. `SamplingParams` checks its own values, so an
invalid request is refused wherever it is built.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field

from .errors import RequestError

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
# What torch.Generator.manual_seed accepts (int64 or uint64); beyond it raises ValueError.
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1
MAX_TEMPERATURE = 100

FINISH_STOP, FINISH_LENGTH, FINISH_ABORT = "stop", "length", "abort"


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # keep generating past EOS (benchmarks want a fixed token count)

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and 0 <= self.temperature <= MAX_TEMPERATURE):
            raise RequestError(f"temperature must be in [0, {MAX_TEMPERATURE}], got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise RequestError(f"top_k must be null or an integer >= 1, got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not MIN_SEED <= self.seed <= MAX_SEED):
            raise RequestError(f"seed must be null or an integer in [{MIN_SEED}, {MAX_SEED}], got {self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if len(stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in stop):
            raise RequestError(
                f"stop must be at most {MAX_STOP_STRINGS} non-empty strings of <= {MAX_STOP_CHARS} chars"
            )
        object.__setattr__(self, "stop", stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class GenerationRequest:
    """One generation: `input` text for `task_id` (None = no soft prompt)."""

    input: str
    task_id: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class GenerationResult:
    request_id: str
    task_id: str | None
    adapter_version: int | None
    text: str
    finish_reason: str
    token_ids: list[int]
    input_tokens: int
    soft_prompt_tokens: int
    soft_prompt_tokens_saved: int
    # Positions of the soft prompt this request's prefill ran: 0 when its keys/values were reused
    # (prompt-KV cache, vLLM's prefix cache). Pooling saved prefill time only where it ran.
    soft_prompt_tokens_computed: int
    completion_tokens: int
    queue_ms: float
    prefill_ms: float
    decode_ms: float
    ttft_ms: float
    total_ms: float
    replica: str | None = None  # which serving replica produced it (set by the serving layer)

    @classmethod
    def of(cls, request: GenerationRequest, entry, *, text: str, finish_reason: str, token_ids: list[int],
           input_tokens: int, queue_ms: float, prefill_ms: float, decode_ms: float, ttft_ms: float,
           total_ms: float, soft_prompt_tokens_computed: int | None = None) -> "GenerationResult":
        """A request's result; `entry` is the AdapterEntry it resolved (None: no task), from which
        the adapter version and the soft-prompt token counts are taken the same way by every engine;
        `soft_prompt_tokens_computed` defaults to the whole pooled prompt."""
        adapter = entry.adapter if entry is not None else None
        pooled = adapter.pooled_tokens if adapter else 0
        return cls(
            request_id=request.request_id, task_id=request.task_id,
            adapter_version=entry.version if entry is not None else None,
            text=text, finish_reason=finish_reason, token_ids=list(token_ids), input_tokens=input_tokens,
            soft_prompt_tokens=pooled,
            soft_prompt_tokens_saved=(adapter.prompt_tokens - pooled) if adapter else 0,
            soft_prompt_tokens_computed=pooled if soft_prompt_tokens_computed is None else soft_prompt_tokens_computed,
            completion_tokens=len(token_ids), queue_ms=queue_ms, prefill_ms=prefill_ms, decode_ms=decode_ms,
            ttft_ms=ttft_ms, total_ms=total_ms,
        )


@dataclass
class StepOutput:
    """What one engine step produced for one request: new visible text, and the result when done."""

    request_id: str
    delta: str
    result: GenerationResult | None = None

    @property
    def finished(self) -> bool:
        return self.result is not None


def elapsed_ms(start: float | None, end: float | None) -> float:
    """Milliseconds from `start` to `end` (seconds on one clock); 0 when either is unknown."""
    return 0.0 if start is None or end is None else max(0.0, (end - start) * 1000)
