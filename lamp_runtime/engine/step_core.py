"""`StepCoreBase`: what every synchronous step core (the transformers cores of lamp_runtime/hf/ and
the llama.cpp core) does the same way: its fair waiting queue and abort set, a request's state,
aborts and task limits from any thread, and forgetting an adapter version's cached work. The
engine packages never import each other, so what they share lives here, beside the contract.

A subclass sets `backbone`, `config`, `cache`, `resident` and `_eos_ids` before calling
`_init_queue`, and says on which device a request's sampling generator lives (`generator_device`);
a core with a prompt-KV cache sets `prompt_kv`.
"""

from __future__ import annotations

import threading

import torch

from ..requests import GenerationRequest
from .fair_queue import FairQueue, TaskLimits, for_config, task_key
from .request_state import RequestState
from .sampling import make_generator


class StepCoreBase:
    prompt_kv = None  # a core's prompt-KV cache (prompts/prompt_kv.py), when it has one

    @property
    def generator_device(self) -> torch.device:
        return torch.device("cpu")

    def _init_queue(self, can_pause: bool) -> None:
        self._lock = threading.Lock()
        # Fair between tasks (engine/fair_queue.py): the order newcomers enter the batch.
        self._waiting: FairQueue = for_config(self.config, can_pause=can_pause)
        self._aborted: set[str] = set()

    def _sequence(self, request: GenerationRequest, input_ids: list[int], entry, index: int) -> RequestState:
        """Sample `index` of `request`, with its own generator (seeded per sample)."""
        generator = make_generator(request.params, self.generator_device, index)
        return RequestState(request, input_ids, entry, generator, self.backbone.tokenizer, self._eos_ids, index)

    def abort(self, request_id: str) -> None:
        """Any thread: the loop drops the request at its next step (`_take_aborted`)."""
        with self._lock:
            self._aborted.add(request_id)

    def _take_aborted(self) -> set[str]:
        with self._lock:
            aborted, self._aborted = self._aborted, set()
        return aborted

    def set_task_limits(self, task_id: str, limits: TaskLimits) -> None:
        self._waiting.set_limits(task_key(task_id), limits)

    def discard(self, cache_key) -> None:
        """Forget what was built for an adapter version (replaced or deleted): its prompt, its
        resident factors, its prompt KV; requests still running on it keep what they hold."""
        self.cache.discard(cache_key)
        self.resident.discard(cache_key)
        if self.prompt_kv is not None:
            self.prompt_kv.discard(cache_key)

    def prompt_kv_stats(self):
        return self.prompt_kv.stats() if self.prompt_kv is not None else None
