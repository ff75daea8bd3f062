"""Request and response schemas of the HTTP API (pydantic), as vLLM keeps them in protocol.py.

Requests convert themselves into the engine's one request shape (`to_engine`), and responses are
built from its `GenerationResult` (`from_result`): nothing else crosses to or from the replicas.

- `/generate`: our own API, strict (unknown fields are errors, so a typo is not silently ignored).
- `/v1/completions`, `/v1/models`: the OpenAI shapes, lenient about fields the official client may
  send, but refusing options we cannot honour (n > 1, echo, logprobs, suffix, best_of) by name.
- admin: what the adapter store reports.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lamp_runtime.requests import MAX_STOP_STRINGS, MAX_TEMPERATURE, GenerationRequest, GenerationResult, SamplingParams

from ..store.base import StoredAdapter


def unicode_text(value: str) -> str:
    """JSON can carry lone surrogates ("\\ud800"): valid JSON, but not text the tokenizer can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"contains a lone surrogate {value[exc.start]!r} at character {exc.start}; "
                         "send valid Unicode text") from None
    return value


class SamplingFields(BaseModel):
    """The sampling fields both APIs share; types and ranges here, the full rules in SamplingParams
    (lamp_runtime/requests.py), which `to_engine` builds."""

    temperature: float = Field(0.0, ge=0, le=MAX_TEMPERATURE)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)  # not OpenAI; vLLM accepts it too (via extra_body)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    seed: int | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value):
        """OpenAI clients send `stop` as null, one string or a list of strings."""
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    def sampling_params(self, max_new_tokens: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, stop=tuple(self.stop), seed=self.seed)


class GenerateRequest(SamplingFields):
    model_config = ConfigDict(extra="forbid")

    task_id: str = Field(min_length=1, max_length=64)
    input: str
    max_new_tokens: int = Field(64, ge=1)
    stream: bool = False

    @field_validator("input")
    @classmethod
    def _input_text(cls, value):
        return unicode_text(value)

    def to_engine(self) -> GenerationRequest:
        """The engine request; raises RequestError for values only SamplingParams checks."""
        return GenerationRequest(self.input, self.task_id, self.sampling_params(self.max_new_tokens))


class Usage(BaseModel):
    input_tokens: int
    soft_prompt_tokens: int
    completion_tokens: int


class Timings(BaseModel):
    queue: float
    prefill: float
    decode: float
    total: float


class GenerateResponse(BaseModel):
    task_id: str
    text: str
    finish_reason: str
    adapter_version: int | None = None
    usage: Usage
    timings_ms: Timings

    @classmethod
    def from_result(cls, result: GenerationResult) -> "GenerateResponse":
        return cls(
            task_id=result.task_id, text=result.text, finish_reason=result.finish_reason,
            adapter_version=result.adapter_version,
            usage=Usage(input_tokens=result.input_tokens, soft_prompt_tokens=result.soft_prompt_tokens,
                        completion_tokens=result.completion_tokens),
            timings_ms=Timings(queue=round(result.queue_ms, 3), prefill=round(result.prefill_ms, 3),
                               decode=round(result.decode_ms, 3), total=round(result.total_ms, 3)),
        )


class GenerateStreamEvent(BaseModel):
    """One server-sent event of `/generate` with `stream: true`: new text, and on the last event
    the finish reason, usage and timings. The stream ends with `data: [DONE]`."""

    task_id: str
    delta: str
    finish_reason: str | None = None
    adapter_version: int | None = None
    usage: Usage | None = None
    timings_ms: Timings | None = None


# ---- OpenAI-compatible ---------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


# Completion options we do not implement: (is this value refused?, the message).
UNSUPPORTED = {
    "n": (lambda v: v != 1, "only n=1 is supported, got {value}"),
    "best_of": (lambda v: v not in (None, 1), "best_of is not supported, got {value}"),
    "echo": (bool, "echo is not supported"),
    "logprobs": (lambda v: v is not None, "logprobs are not supported"),
    "suffix": (bool, "suffix is not supported"),
}


class CompletionRequest(SamplingFields):
    """OpenAI `POST /v1/completions`; `model` is the task id. OpenAI defaults: max_tokens 16, temperature 1."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=64)
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, le=100)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    user: str | None = None

    @field_validator("n", "best_of", "echo", "logprobs", "suffix")
    @classmethod
    def _unsupported(cls, value, info):
        """Options we cannot honour are refused by name rather than silently ignored."""
        refused, message = UNSUPPORTED[info.field_name]
        if refused(value):
            raise ValueError(message.format(value=value))
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt_list(cls, value):
        if isinstance(value, list) and not 1 <= len(value) <= 32:
            raise ValueError(f"prompt must be a string or a list of 1..32 strings, got a list of {len(value)}")
        for text in [value] if isinstance(value, str) else value:
            unicode_text(text)
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def to_engine(self) -> list[GenerationRequest]:
        """One engine request per prompt; raises RequestError for values only SamplingParams checks."""
        params = self.sampling_params(self.max_tokens)
        return [GenerationRequest(prompt, self.model, params) for prompt in self.prompts]


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, results: list[GenerationResult]) -> "CompletionUsage":
        prompt = sum(r.input_tokens for r in results)
        completion = sum(r.completion_tokens for r in results)
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lamp-serve"


class PageFields(BaseModel):
    """A cursor page (serving/http/paging.py): pass `last_id` as `after` while `has_more`."""

    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None
    total: int | None = None  # tasks in all, on every page

    @classmethod
    def of(cls, page, **fields):
        ids = [a.task_id for a in page.adapters]
        return cls(has_more=page.has_more, first_id=ids[0] if ids else None, last_id=ids[-1] if ids else None,
                   total=page.total, **fields)


class ModelList(PageFields):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- admin ---------------------------------------------------------------------------------------


class AdapterList(PageFields):
    adapters: list[StoredAdapter]


class BatchResult(BaseModel):
    task_id: str
    status: int  # 201, or the status a single PUT of this adapter would have had
    adapter: StoredAdapter | None = None
    error: str | None = None


class BatchResponse(BaseModel):
    registered: int
    failed: int
    results: list[BatchResult]


class HealthResponse(BaseModel):
    status: Literal["ok"]
    backbone: str
    replica: str
