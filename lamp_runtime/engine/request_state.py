"""State of one request inside the engine: tokens so far, visible text, stop handling, timings."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from ..adapters.registry import AdapterEntry
from .detokenize import IncrementalDetokenizer
from ..prompts.prepared import PreparedPrompt
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


class RequestState:
    def __init__(self, request: GenerationRequest, input_ids: list[int], entry: AdapterEntry | None,
                 generator: torch.Generator | None, tokenizer, eos_ids: set[int], index: int = 0):
        self.request = request
        self.index = index  # which of the request's n samples
        # Samples still to be forked from this one once its prefill ran (engines that share it).
        self.forks = 0
        self.params = request.params
        self.input_ids = input_ids
        self.entry = entry
        self.generator = generator
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.prepared: PreparedPrompt | None = None  # pinned in the prompt cache while running
        # What its core kept of a row it paused for another task (fair_queue.py), until it resumes.
        self.paused: object | None = None
        self.generated: list[int] = []
        self.last_token: int | None = None  # the next decode step's input
        self.text = ""
        self._detokenizer = IncrementalDetokenizer(tokenizer, self.generated)
        self.emitted = 0  # characters of `text` already streamed
        self.finish_reason: str | None = None
        self.submitted_at = time.perf_counter()
        self.admitted_at = self.first_token_at = self.finished_at = None
        self.prefill_seconds = 0.0
        self.prompt_reused = False  # its soft prompt's keys/values came from the prompt-KV cache
        self.logprobs: list[TokenLogprob] | None = [] if self.params.logprobs is not None else None
        self.logprobs_emitted = 0
        self.prompt_logprobs: list[TokenLogprob] | None = None

    @property
    def width(self) -> int:
        """Batch rows this sequence will hold once prefilled (itself and its forks)."""
        return 1 + self.forks

    def fork(self, index: int, generator: torch.Generator | None) -> "RequestState":
        """Sample `index` of this request, prefilled together with this one (same context, own draws)."""
        child = RequestState(self.request, self.input_ids, self.entry, generator, self.tokenizer, self.eos_ids, index)
        child.submitted_at, child.admitted_at = self.submitted_at, self.admitted_at
        # It computed no position of its own: its soft prompt's keys/values are the parent's copy.
        child.prefill_seconds, child.prompt_reused = self.prefill_seconds, True
        child.prompt_logprobs = self.prompt_logprobs
        return child

    @property
    def soft_prompt_tokens(self) -> int:
        return self.entry.adapter.pooled_tokens if self.entry else 0

    @property
    def length(self) -> int:
        """Tokens in the model's context so far (soft prompt + input + generated)."""
        return self.soft_prompt_tokens + len(self.input_ids) + len(self.generated)

    def accept(self, token_id: int, logprob: TokenLogprob | None = None) -> StepOutput:
        """Record a sampled token (and its log-probability, when asked for); decide whether the
        request is finished; return what to stream."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.last_token = token_id
        if self.params.max_new_tokens == 0:  # scoring only: the prefill gave the prompt logprobs
            self.finish_reason = FINISH_LENGTH
            return self._emit()
        if self.logprobs is not None and logprob is not None:
            # EOS included, as OpenAI and vLLM report it: harnesses read the last entry as the
            # generated one (echo + max_tokens 1), so a completion that ends at once still has one.
            self.logprobs.append(logprob)
        if token_id in self.eos_ids and not self.params.ignore_eos:
            self.finish_reason = FINISH_STOP
            self.text = self._detokenizer.final()
        else:
            self.generated.append(token_id)
            self.text = self._detokenizer.update()
            cut = self._stop_index()
            if cut is not None:
                self.text = self.text[:cut]
                self.finish_reason = FINISH_STOP
            elif len(self.generated) >= self.params.max_new_tokens:
                self.finish_reason = FINISH_LENGTH
                self.text = self._detokenizer.final()
        return self._emit()

    def abort(self) -> StepOutput:
        self.finish_reason = FINISH_ABORT
        return self._emit()

    def _stop_index(self) -> int | None:
        found = [i for i in (self.text.find(s) for s in self.params.stop) if i >= 0]
        return min(found) if found else None

    def _safe_to_stream(self) -> int:
        """Length of text that can be streamed without later being retracted: hold back an
        incomplete UTF-8 character and any tail that could still grow into a stop string."""
        end = len(self.text)
        if self.text.endswith("\ufffd"):
            end -= 1
        for stop in self.params.stop:
            for k in range(min(len(stop) - 1, end), 0, -1):
                if self.text[:end].endswith(stop[:k]):
                    end -= k
                    break
        return max(end, self.emitted)

    def _emit(self) -> StepOutput:
        end = len(self.text) if self.finish_reason else self._safe_to_stream()
        delta, self.emitted = self.text[self.emitted:end], end
        logprobs = None
        if self.logprobs is not None:
            logprobs, self.logprobs_emitted = self.logprobs[self.logprobs_emitted:], len(self.logprobs)
        result = None
        if self.finish_reason:
            self.finished_at = time.perf_counter()
            result = self._result()
        return StepOutput(self.request.request_id, delta, result, self.index, logprobs)

    def _result(self) -> GenerationResult:
        admitted = self.admitted_at or self.finished_at
        return GenerationResult.of(
            self.request, self.entry, text=self.text, finish_reason=self.finish_reason, token_ids=self.generated,
            input_tokens=len(self.input_ids),
            queue_ms=elapsed_ms(self.submitted_at, admitted),
            prefill_ms=self.prefill_seconds * 1000,
            decode_ms=elapsed_ms(self.first_token_at, self.finished_at),
            ttft_ms=elapsed_ms(self.submitted_at, self.first_token_at),
            total_ms=elapsed_ms(self.submitted_at, self.finished_at),
            soft_prompt_tokens_computed=0 if self.prompt_reused else self.soft_prompt_tokens,
            index=self.index, logprobs=self.logprobs, prompt_logprobs=self.prompt_logprobs,
        )
