"""Each (task, version)'s soft-prompt keys/values, computed once and kept in host memory.

The engine gives every request row a KV stream of its own (native.new_context), so a task's prompt
cells cannot be shared between rows by reference. Instead, on a miss the prompt runs into the
newcomer's own stream and a copy of that sequence's cells is taken (`native.read_seq_state`,
llama.cpp's state format); on a hit the copy is written into the newcomer's stream
(`native.write_seq_state`: 0.5 ms for 200 positions of the embedded SmolLM2, against tens of
milliseconds to recompute them). Bounded by bytes (`EngineConfig.prompt_kv_cache_bytes`), least
recently used first, dropped on re-registration (`discard`): a prompts.prompt_kv.PromptKVLRU of
PromptStates, stored by `acquire` after the loop built them outside its lock (a build is a
llama_decode, seconds on a 7B) and looked up by `acquire_cached`.
Not by sequence ids or cells: a cached prompt holds no part of llama.cpp's KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PromptState:
    data: np.ndarray  # uint8: one sequence's cells as llama_state_seq_get_data writes them
    tokens: int  # positions held (the pooled prompt's length)
    unpooled_tokens: int  # the task's prompt length before pooling (l)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

