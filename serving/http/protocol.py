"""Request and response schemas of the HTTP API (pydantic), as vLLM keeps them in protocol.py.

Requests convert themselves into the engine's one request shape (`to_engine`), and responses are
built from its `GenerationResult` (`from_result`): nothing else crosses to or from the replicas.

- `/generate`: our own API, strict (unknown fields are errors, so a typo is not silently ignored).
- `/v1/completions`, `/v1/models`: the OpenAI shapes, lenient about fields the official client may
  send, but refusing options we cannot honour (suffix, best_of) by name. Chat completions: chat.py.
- admin: what the adapter store reports.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lamp_runtime.requests import (
    DEFAULT_MAX_NEW_TOKENS,
    MAX_LOGPROBS,
    MAX_SAMPLES,
    MAX_STOP_STRINGS,
    MAX_TEMPERATURE,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
)

from ..store.base import StoredAdapter
from .logprobs import CompletionLogprobs


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

    def sampling_params(self, max_new_tokens: int, **more) -> SamplingParams:
        """`more`: the endpoint's own options (logprobs, prompt_logprobs, n)."""
        return SamplingParams(max_new_tokens=max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, stop=tuple(self.stop), seed=self.seed, **more)


class GenerateRequest(SamplingFields):
    model_config = ConfigDict(extra="forbid")

    task_id: str = Field(min_length=1, max_length=64)
    input: str
    max_new_tokens: int = Field(DEFAULT_MAX_NEW_TOKENS, ge=1)
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
    "best_of": (lambda v: v not in (None, 1), "best_of is not supported, got {value}; use n"),
    "suffix": (bool, "suffix is not supported"),
}


class OpenAIFields(SamplingFields):
    """What OpenAI's completions and chat completions share: the model (our task id), OpenAI's
    default temperature 1, n samples of each prompt, streaming."""

    model: str = Field(min_length=1, max_length=64)
    temperature: float = Field(1.0, ge=0, le=MAX_TEMPERATURE)
    n: int = Field(1, ge=1, le=MAX_SAMPLES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def sampling_params(self, max_new_tokens: int, **more) -> SamplingParams:
        return super().sampling_params(max_new_tokens, n=self.n, **more)


class CompletionRequest(OpenAIFields):
    """OpenAI `POST /v1/completions`; `model` is the task id. OpenAI defaults: max_tokens 16, temperature 1.

    `logprobs: k` returns each generated token's log-probability and its k best alternatives
    (k <= 20); with `echo` the prompt comes back before the completion, and with `logprobs` its
    tokens' log-probabilities too; `max_tokens: 0` with `echo` scores the prompt only (how
    evaluation harnesses compute a continuation's likelihood).
    """

    model_config = ConfigDict(extra="ignore")

    prompt: str | list[str] | list[int] | list[list[int]]  # text, or token ids (as harnesses send)
    max_tokens: int = Field(16, ge=0)
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None

    @field_validator("best_of", "suffix")
    @classmethod
    def _unsupported(cls, value, info):
        """Options we cannot honour are refused by name rather than silently ignored."""
        refused, message = UNSUPPORTED[info.field_name]
        if refused(value):
            raise ValueError(message.format(value=value))
        return value

    @model_validator(mode="after")
    def _echo_rules(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 generates nothing: only with echo (to score the prompt)")
        if self.echo and self.stream:
            raise ValueError("echo is not supported with stream; send stream=false")
        return self

    @field_validator("prompt")
    @classmethod
    def _prompt_list(cls, value):
        prompts = _as_prompts(value)
        if not 1 <= len(prompts) <= MAX_PROMPTS:
            raise ValueError(f"prompt must be a string, a list of token ids, or a list of 1..{MAX_PROMPTS} of "
                             f"either, got {len(prompts)} prompts")
        for prompt in prompts:
            if isinstance(prompt, str):
                unicode_text(prompt)
            elif not prompt:
                raise ValueError("a prompt of token ids must hold at least one id")
        return value

    @property
    def prompts(self) -> list[str | list[int]]:
        return _as_prompts(self.prompt)

    def to_engine(self) -> list[GenerationRequest]:
        """One engine request per prompt (each for n samples); raises RequestError for values only
        SamplingParams checks. The prompt is scored when echoed with logprobs, or to allow max_tokens 0."""
        prompts = self.prompts
        # scored: echoed with logprobs; to allow max_tokens 0; or echoed token ids (the scores carry the text)
        tokens = any(not isinstance(p, str) for p in prompts)
        scored = self.echo and (self.logprobs is not None or self.max_tokens == 0 or tokens)
        prompt_logprobs = (self.logprobs or 0) if scored else None
        params = self.sampling_params(self.max_tokens, logprobs=self.logprobs, prompt_logprobs=prompt_logprobs)
        return [GenerationRequest(p, self.model, params) if isinstance(p, str)
                else GenerationRequest("", self.model, params, input_ids=tuple(p)) for p in prompts]

    def choice(self, index: int, prompt: str | list[int], result: GenerationResult) -> "CompletionChoice":
        """The choice for one sample of `prompt`; `index` counts choices across prompts and samples."""
        if isinstance(prompt, list) and self.echo:  # token ids: their text is in the scores
            prompt = "".join(entry.token for entry in result.prompt_logprobs or [])
        text = prompt + result.text if self.echo else result.text
        logprobs = None
        if self.logprobs is not None:
            entries = (result.prompt_logprobs or []) if self.echo else []
            logprobs = CompletionLogprobs.of(entries + (result.logprobs or []))
        return CompletionChoice(index=index, text=text, logprobs=logprobs,
                                finish_reason=openai_finish(result.finish_reason))


MAX_PROMPTS = 32


def _as_prompts(value) -> list[str | list[int]]:
    """OpenAI's prompt forms as a list of prompts: a string, a list of token ids, or a list of either."""
    if isinstance(value, str) or (value and isinstance(value[0], int)):
        return [value]
    return list(value)


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def openai_finish(reason: str) -> str | None:
    return reason if reason in ("stop", "length") else None


class Choice(BaseModel):
    """What every OpenAI choice has, whole or a stream's chunk (finish_reason None until its last)."""

    index: int
    finish_reason: Literal["stop", "length"] | None = None


class CompletionChoice(Choice):
    text: str
    logprobs: CompletionLogprobs | None = None


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, results: list[GenerationResult]) -> "CompletionUsage":
        """Every sample's completion tokens; each prompt's tokens once (its n samples share them)."""
        prompt = sum(r.input_tokens for r in results if r.index == 0)
        completion = sum(r.completion_tokens for r in results)
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class Answer(BaseModel):
    """What every OpenAI answer object has, whole or a stream's chunk: its id, when, which model."""

    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str


class CompletionResponse(Answer):
    object: Literal["text_completion"] = "text_completion"
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
