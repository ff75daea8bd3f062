"""Request and response schemas of the HTTP API (pydantic), as vLLM keeps them in protocol.py.

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

# Bounds mirror lamp_runtime.sampling.SamplingParams (which checks them again in the replica).
MAX_STOP_STRINGS = 16


def unicode_text(value: str) -> str:
    """JSON can carry lone surrogates ("\\ud800"): valid JSON, but not text the tokenizer can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"contains a lone surrogate {value[exc.start]!r} at character {exc.start}; "
                         "send valid Unicode text") from None
    return value


class SamplingFields(BaseModel):
    temperature: float = Field(0.0, ge=0, le=100)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    seed: int | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value):
        """OpenAI clients send `stop` as null, one string or a list of strings."""
        if value is None:
            return []
        return [value] if isinstance(value, str) else value


class GenerateRequest(SamplingFields):
    model_config = ConfigDict(extra="forbid")

    task_id: str = Field(min_length=1, max_length=64)
    input: str
    max_new_tokens: int = Field(64, ge=1)
    top_k: int | None = Field(None, ge=1)
    stream: bool = False

    @field_validator("input")
    @classmethod
    def _input_text(cls, value):
        return unicode_text(value)

    def engine_params(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "stop": list(self.stop), "seed": self.seed}


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
    def from_result(cls, result: dict) -> "GenerateResponse":
        return cls(
            task_id=result["task_id"], text=result["text"], finish_reason=result["finish_reason"],
            adapter_version=result["adapter_version"],
            usage=Usage(input_tokens=result["input_tokens"], soft_prompt_tokens=result["soft_prompt_tokens"],
                        completion_tokens=result["completion_tokens"]),
            timings_ms=Timings(queue=round(result["queue_ms"], 3), prefill=round(result["prefill_ms"], 3),
                               decode=round(result["decode_ms"], 3), total=round(result["total_ms"], 3)),
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


class CompletionRequest(SamplingFields):
    """OpenAI `POST /v1/completions`; `model` is the task id. OpenAI defaults: max_tokens 16, temperature 1."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=64)
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, le=100)
    top_k: int | None = Field(None, ge=1)  # not OpenAI; vLLM accepts it too (via extra_body)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _single_choice(cls, value):
        if value != 1:
            raise ValueError(f"only n=1 is supported, got {value}")
        return value

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value):
        if value not in (None, 1):
            raise ValueError(f"best_of is not supported, got {value}")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value):
        if value:
            raise ValueError("echo is not supported")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value):
        if value is not None:
            raise ValueError("logprobs are not supported")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value):
        if value:
            raise ValueError("suffix is not supported")
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

    def engine_params(self) -> dict:
        return {"max_new_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "stop": list(self.stop), "seed": self.seed}


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


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- admin ---------------------------------------------------------------------------------------


class AdapterInfo(BaseModel):
    task_id: str
    version: int
    kind: str
    prompt_tokens: int
    pooled_tokens: int
    bytes: int
    sha256: str
    created_at: float
    source: str


class AdapterList(BaseModel):
    adapters: list[AdapterInfo]


class HealthResponse(BaseModel):
    status: Literal["ok"]
    backbone: str
    replica: str
