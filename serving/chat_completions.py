"""Ingress side of OpenAI `POST /v1/chat/completions`: the request becomes one engine request
with the messages and n samples (the replica renders them with the chat template and forks the n
samples from one prefill); the answer is OpenAI's chat shape, whole or as chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator

from lamp_runtime.requests import StepOutput

from .generation import EventStream, GenerationService, Reply, public, replicas_of, sse
from .http.chat import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    chat_completion_id,
)
from .http.logprobs import ChatLogprobs
from .http.protocol import CompletionUsage, openai_finish
from .transport import Refusal

# max_tokens when the request sets none (OpenAI: up to the context); bounded so a forgotten limit
# costs seconds, not minutes, on a CPU; never above the server's --max-new-tokens.
DEFAULT_CHAT_MAX_TOKENS = 256


class ChatCompletions:
    def __init__(self, generation: GenerationService, max_new_tokens: int):
        self.generation = generation
        self.default_max_tokens = min(DEFAULT_CHAT_MAX_TOKENS, max_new_tokens)

    async def create(self, request: ChatCompletionRequest) -> Reply | EventStream:
        engine_request = self.generation.to_engine(request.model, lambda: request.to_engine(self.default_max_tokens))
        if request.stream:
            first, items = await self.generation.open_stream(engine_request)
            return EventStream(self._chunks(request, first, items))
        answer = await self.generation.complete(engine_request)
        results = answer.results
        body = ChatCompletionResponse(id=chat_completion_id(), model=request.model,
                                      choices=[request.choice(r) for r in results], usage=CompletionUsage.of(results))
        return Reply(body.model_dump(), replicas_of([answer]))

    async def _chunks(self, request: ChatCompletionRequest, first: StepOutput, items) -> AsyncIterator[str]:
        """OpenAI's chunk sequence: per sample a first chunk with the role, content deltas, a last
        one with the finish reason; then usage (when asked) and [DONE]."""
        header = {"id": chat_completion_id(), "model": request.model}
        started, results = set(), []
        async for item in self.generation.relay(first, items):
            if isinstance(item, Refusal):
                yield sse({"error": public(item)})
                return
            if item.index not in started:
                started.add(item.index)
                yield _chunk(header, ChatChunkChoice(index=item.index, delta=ChatDelta(role="assistant", content="")))
            result = item.result
            logprobs = ChatLogprobs.of(item.logprobs or []) if request.logprobs else None
            if item.delta or logprobs:
                yield _chunk(header, ChatChunkChoice(index=item.index, delta=ChatDelta(content=item.delta),
                                                     logprobs=logprobs))
            if result is not None:
                results.append(result)
                yield _chunk(header, ChatChunkChoice(index=item.index, delta=ChatDelta(),
                                                     finish_reason=openai_finish(result.finish_reason)))
        if request.stream_options and request.stream_options.include_usage:
            usage = CompletionUsage.of(results)
            yield sse(ChatCompletionChunk(**header, choices=[], usage=usage).model_dump(exclude_none=True))
        yield sse("[DONE]")


def _chunk(header: dict, choice: ChatChunkChoice) -> str:
    return sse(ChatCompletionChunk(**header, choices=[choice]).model_dump(exclude_none=True))
