"""One request in the vLLM engine: vLLM's streamed outputs turned into our StepOutput / GenerationResult.

vLLM already detokenizes incrementally, holds back text that could still become a stop string
and cuts the stop string off, so deltas are passed through. What differs from our HF engine is
normalised here: vLLM counts the EOS token among the completion tokens (we do not), and its
timestamps come from the engine-core process (CLOCK_MONOTONIC, the same clock as
`time.monotonic()` here, so intervals across the two processes are meaningful).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..adapters.registry import AdapterEntry
from ..requests import (
    FINISH_ABORT,
    FINISH_LENGTH,
    FINISH_STOP,
    GenerationResult,
    StepOutput,
    TokenLogprob,
    elapsed_ms,
)

if TYPE_CHECKING:
    from ..requests import GenerationRequest

FINISH_REASONS = {"stop": FINISH_STOP, "length": FINISH_LENGTH, "abort": FINISH_ABORT}


class VllmRequestFailed(RuntimeError):
    """vLLM ended a request with a reason we cannot report as a result (e.g. "error")."""


class VllmSequence:
    def __init__(self, request: GenerationRequest, entry: AdapterEntry | None, input_ids: list[int],
                 eos_ids: set[int] | frozenset[int]):
        self.request = request
        self.entry = entry
        self.input_ids = input_ids
        self.eos_ids = eos_ids
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.text = ""
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.metrics = None  # vLLM's RequestStateStats (engine-core timestamps), when it sends them
        self.cached_tokens = 0  # prompt positions vLLM's prefix cache supplied
        self.logprobs: list[TokenLogprob] | None = [] if request.params.logprobs is not None else None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def task_id(self) -> str | None:
        return self.request.task_id

    @property
    def started(self) -> bool:
        """Prefilled: it has produced its first token."""
        return self.first_token_at is not None

    @property
    def soft_prompt_tokens(self) -> int:
        return self.entry.adapter.pooled_tokens if self.entry else 0

    def accept(self, output) -> StepOutput:
        """Record one vLLM RequestOutput (DELTA kind: only what is new) and return what to stream."""
        completion = output.outputs[0]
        if completion.token_ids and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.token_ids.extend(completion.token_ids)
        logprobs = None
        if self.logprobs is not None:
            logprobs = vllm_logprobs(completion.token_ids, completion.logprobs, self.request.params.logprobs)
            self.logprobs.extend(logprobs)
        self.text += completion.text
        if output.metrics is not None:
            self.metrics = output.metrics
        if output.num_cached_tokens:
            self.cached_tokens = output.num_cached_tokens
        if not output.finished:
            return StepOutput(self.request_id, completion.text, logprobs=logprobs)
        reason = FINISH_REASONS.get(str(completion.finish_reason))
        if reason is None:
            raise VllmRequestFailed(f"vLLM ended request {self.request_id} with finish reason "
                                    f"{completion.finish_reason!r}")
        # An EOS (or one of the EOS ids we pass as stop_token_ids) is reported as a completion token
        # by vLLM; our engine never counts it. A stop *string* (stop_reason str) keeps its tokens.
        stop_reason = completion.stop_reason
        if (reason == FINISH_STOP and not isinstance(stop_reason, str) and self.token_ids
                and self.token_ids[-1] in self.eos_ids):
            self.token_ids.pop()  # its logprob stays: OpenAI and vLLM report the EOS entry
        return self._finish(reason, completion.text, logprobs)

    def abort(self) -> StepOutput:
        return self._finish(FINISH_ABORT, "")

    def _finish(self, reason: str, delta: str, logprobs=None) -> StepOutput:
        self.finish_reason = reason
        self.finished_at = time.monotonic()
        return StepOutput(self.request_id, delta, self._result(), logprobs=logprobs)

    def _result(self) -> GenerationResult:
        metrics = self.metrics
        scheduled = (metrics.scheduled_ts or None) if metrics is not None else None
        engine_first_token = (metrics.first_token_ts or None) if metrics is not None else None
        return GenerationResult.of(
            self.request, self.entry, text=self.text, finish_reason=self.finish_reason, token_ids=self.token_ids,
            input_tokens=len(self.input_ids),
            queue_ms=elapsed_ms(self.submitted_at, scheduled or self.finished_at),
            prefill_ms=elapsed_ms(scheduled, engine_first_token),
            decode_ms=elapsed_ms(self.first_token_at, self.finished_at),
            ttft_ms=elapsed_ms(self.submitted_at, self.first_token_at),
            total_ms=elapsed_ms(self.submitted_at, self.finished_at),
            # the soft prompt comes first, so cached positions are its own up to its length
            soft_prompt_tokens_computed=self.soft_prompt_tokens - min(self.cached_tokens, self.soft_prompt_tokens),
            logprobs=self.logprobs,
        )


def vllm_logprobs(token_ids, entries, k: int) -> list[TokenLogprob]:
    """vLLM's per-token {token id: Logprob(logprob, rank, decoded_token)} maps (the sampled token
    and the top k) in our shape. vLLM reports raw logprobs by default, as the HF engines do."""
    out = []
    for token_id, candidates in zip(token_ids, entries or []):
        chosen = candidates[token_id]
        top = sorted((c.rank, c.decoded_token or "", tid, c.logprob) for tid, c in candidates.items()
                     if c.rank is not None and c.rank <= k)
        out.append(TokenLogprob(token_id, chosen.decoded_token or "", chosen.logprob,
                                tuple((text, tid, lp) for _, text, tid, lp in top)))
    return out
