"""OpenAI `POST /v1/chat/completions` schemas; `model` is the task id.

The messages cross to the engine as they are (`GenerationRequest.messages`): the backbone
tokenizer's own chat template renders them there, after the task's soft prompt (its EPT offset on
the first templated tokens), or the task's `input_template` when the task or the request asks
(`chat_format`, an extension: send it in the client's `extra_body`). See docs/serving.md.
"""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lamp_runtime.requests import (
    CHAT_FORMATS,
    MAX_LOGPROBS,
    ChatMessage,
    GenerationRequest,
    GenerationResult,
)

from .logprobs import ChatLogprobs
from .protocol import Answer, Choice, CompletionUsage, OpenAIFields, openai_finish, unicode_text

# What a message's role may be; OpenAI's newer "developer" role is the system role of older models.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Chat options we do not implement, refused by name when set rather than silently ignored.
UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "audio", "prediction", "web_search_options")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. `name`

    role: str
    content: str | list[TextPart] | None = None

    @field_validator("role")
    @classmethod
    def _role(cls, value):
        if value not in ROLES:
            raise ValueError(f"role must be one of {sorted(ROLES)}, got {value!r}")
        return value

    def to_engine(self) -> ChatMessage:
        if self.content is None:
            text = ""
        elif isinstance(self.content, str):
            text = self.content
        else:  # text parts, joined as vLLM joins them
            text = "\n".join(part.text for part in self.content)
        return ChatMessage(ROLES[self.role], unicode_text(text))


class ChatCompletionRequest(OpenAIFields):
    """OpenAI defaults: temperature 1; `max_tokens` / `max_completion_tokens` unset = the server's
    chat default (`DEFAULT_CHAT_MAX_TOKENS`, within its --max-new-tokens)."""

    model_config = ConfigDict(extra="allow")

    messages: list[Message] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    chat_format: Literal[CHAT_FORMATS] | None = None  # ours: how the messages become input text
    response_format: dict | None = None

    @model_validator(mode="after")
    def _supported(self):
        for name in UNSUPPORTED:
            if (self.model_extra or {}).get(name):
                raise ValueError(f"{name} is not supported")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise ValueError(f"response_format {self.response_format.get('type')!r} is not supported; only text")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens differ; send one")
        return self

    def to_engine(self, default_max_tokens: int) -> GenerationRequest:
        """The engine request for the n samples; raises RequestError for values only SamplingParams checks."""
        max_tokens = self.max_completion_tokens or self.max_tokens or default_max_tokens
        params = self.sampling_params(max_tokens, logprobs=(self.top_logprobs or 0) if self.logprobs else None)
        return GenerationRequest("", self.model, params, messages=tuple(m.to_engine() for m in self.messages),
                                 chat_format=self.chat_format)

    def choice(self, result: GenerationResult) -> "ChatChoice":
        logprobs = ChatLogprobs.of(result.logprobs or []) if self.logprobs else None
        return ChatChoice(index=result.index, message=AssistantMessage(content=result.text), logprobs=logprobs,
                          finish_reason=openai_finish(result.finish_reason))


def chat_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(Choice):
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: CompletionUsage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(Choice):
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(Answer):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: CompletionUsage | None = None
