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
MAX_LOGPROBS = 20  # top alternatives per token, as OpenAI allows
MAX_SAMPLES = 16  # n: samples of one prompt (each holds a batch slot)
# The engines' limits by default (EngineConfig; `lamp serve`'s settings pass theirs on): input tokens
# per request and max_new_tokens a request may ask for.
MAX_INPUT_TOKENS_LIMIT = 2048
MAX_NEW_TOKENS_LIMIT = 1024
DEFAULT_MAX_NEW_TOKENS = 64  # /generate's and `lamp generate`'s default (OpenAI's APIs have their own)
CHAT_ROLES = ("system", "user", "assistant")
# How a chat request's messages become the model's input text: the backbone tokenizer's own chat
# template, or the task's training template (`input_template` in its metadata) around the last
# user message, for tasks trained on plain text (docs/serving.md, "Chat completions").
CHAT_FORMATS = ("chat_template", "input_template")

FINISH_STOP, FINISH_LENGTH, FINISH_ABORT = "stop", "length", "abort"


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # keep generating past EOS (benchmarks want a fixed token count)
    # Log-probabilities, from the model's own distribution (the logits before temperature, top-k
    # and top-p; as vLLM's default): None = not returned; k = the chosen token's and the k most
    # likely alternatives' (0 <= k <= 20). `prompt_logprobs` does the same for every input token
    # (`echo` on /v1/completions); it allows max_new_tokens = 0 (score a text, generate nothing).
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    n: int = 1  # samples of this one prompt; sample i draws with seed + i (see sample_seed)

    def __post_init__(self):
        _check_optional_int("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        _check_optional_int("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS)
        _check_optional_int("n", self.n, 1, MAX_SAMPLES)
        least = 0 if self.prompt_logprobs is not None else 1
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < least:
            raise RequestError(f"max_new_tokens must be an integer >= {least}, got {self.max_new_tokens!r}"
                               + ("" if least == 0 else " (0 only to score the input: with prompt logprobs)"))
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

    def sample_seed(self, index: int) -> int | None:
        """The seed sample `index` of `n` draws with: the request's seed for the first, seed + i
        (wrapped to the 64 bits torch accepts) for the others, so each sample is reproducible."""
        if self.seed is None or index == 0:
            return self.seed
        return (self.seed + index) % 2**64


def _check_optional_int(name: str, value, low: int, high: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
        raise RequestError(f"{name} must be {'null or ' if name != 'n' else ''}an integer in [{low}, {high}], "
                           f"got {value!r}")


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str

    def __post_init__(self):
        if self.role not in CHAT_ROLES:
            raise RequestError(f"message role must be one of {list(CHAT_ROLES)}, got {self.role!r}")
        if not isinstance(self.content, str):
            raise RequestError(f"message content must be text, got {type(self.content).__name__}")


@dataclass
class GenerationRequest:
    """One generation: `input` text for `task_id` (None = no soft prompt).

    A chat request carries `messages` instead (and `input` is empty): the engine turns them into
    input text with `chat_format` (None = the task's own setting, else the backbone's template).
    A request may also carry the input as token ids (`input_ids`, as OpenAI prompts may).
    """

    input: str
    task_id: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    messages: tuple[ChatMessage, ...] | None = None
    chat_format: str | None = None
    input_ids: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.messages is not None and not self.messages:
            raise RequestError("messages must hold at least one message")
        given = [name for name, value in (("input text", self.input), ("chat messages", self.messages),
                                          ("input token ids", self.input_ids)) if value]
        if len(given) > 1:
            raise RequestError(f"a request carries one of input text, chat messages or input token ids, "
                               f"got {' and '.join(given)}")
        if self.input_ids is not None and any(isinstance(t, bool) or not isinstance(t, int) or t < 0
                                              for t in self.input_ids):
            raise RequestError("input token ids must be integers >= 0")
        if self.chat_format is not None and self.chat_format not in CHAT_FORMATS:
            raise RequestError(f"chat_format must be one of {list(CHAT_FORMATS)}, got {self.chat_format!r}")


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and its most likely alternatives ((text, id, logprob), best first).
    `logprob` is None for an input's first token when nothing precedes it (no soft prompt)."""

    token_id: int
    token: str
    logprob: float | None
    top: tuple[tuple[str, int, float], ...] = ()


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
    index: int = 0  # which of the request's n samples
    # One per generated token when asked for, plus the EOS that ended it (as OpenAI reports it).
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # one per input token, when asked for

    @classmethod
    def of(cls, request: GenerationRequest, entry, *, text: str, finish_reason: str, token_ids: list[int],
           input_tokens: int, queue_ms: float, prefill_ms: float, decode_ms: float, ttft_ms: float,
           total_ms: float, soft_prompt_tokens_computed: int | None = None, index: int = 0,
           logprobs: list[TokenLogprob] | None = None,
           prompt_logprobs: list[TokenLogprob] | None = None) -> "GenerationResult":
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
            ttft_ms=ttft_ms, total_ms=total_ms, index=index, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        )


@dataclass
class StepOutput:
    """What one engine step produced for one request: new visible text, and the result when done."""

    request_id: str
    delta: str
    result: GenerationResult | None = None
    index: int = 0  # which of the request's n samples
    logprobs: list[TokenLogprob] | None = None  # the tokens sampled since the previous output

    @property
    def finished(self) -> bool:
        return self.result is not None


def elapsed_ms(start: float | None, end: float | None) -> float:
    """Milliseconds from `start` to `end` (seconds on one clock); 0 when either is unknown."""
    return 0.0 if start is None or end is None else max(0.0, (end - start) * 1000)
