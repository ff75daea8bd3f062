"""Token log-probabilities in OpenAI's two shapes: the legacy completions one (parallel lists with
text offsets) and the chat one (a list of tokens, each with its top alternatives and UTF-8 bytes).

Both are built from the engine's `TokenLogprob`s; the values are the model's own distribution,
before temperature, top-k and top-p (lamp_runtime/engine/logprobs.py), as vLLM reports them.
"""

from __future__ import annotations

from pydantic import BaseModel

from lamp_runtime.requests import TokenLogprob


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]

    @classmethod
    def of(cls, entries: list[TokenLogprob], start: int = 0) -> "CompletionLogprobs":
        """`start`: the text offset of the first token (0: the choice's text begins with it)."""
        offsets, at = [], start
        for entry in entries:
            offsets.append(at)
            at += len(entry.token)
        return cls(
            tokens=[e.token for e in entries],
            token_logprobs=[e.logprob for e in entries],
            # nothing precedes a first input token with no soft prompt: no alternatives either
            top_logprobs=[None if e.logprob is None else {text: lp for text, _, lp in e.top} for e in entries],
            text_offset=offsets,
        )


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]

    @classmethod
    def of(cls, entries: list[TokenLogprob]) -> "ChatLogprobs":
        return cls(content=[
            ChatTokenLogprob(token=e.token, logprob=e.logprob, bytes=list(e.token.encode("utf-8")),
                             top_logprobs=[ChatTopLogprob(token=t, logprob=lp, bytes=list(t.encode("utf-8")))
                                           for t, _, lp in e.top])
            for e in entries])
