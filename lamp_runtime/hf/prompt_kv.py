"""The prompt-KV cache: each (task, version)'s soft-prompt keys and values, computed once.

A task's pooled prompt is the same for every request of that version and sits first in the
sequence, so its keys and values at positions 0..m-1 are the same for every request too. They are
computed once (a forward over the prompt alone) and kept here, bounded by bytes (LRU, pinned while
a prefill copies them into its slot); a request's prefill then runs only its input tokens, which
attend to the cached prompt. Keyed like the prompt cache, so a re-registered task never reuses a
stale entry, and the serving layer drops an old version's entry as it drops its prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..prompts.prompt_kv import PromptKVLRU


@dataclass(frozen=True)
class PromptKV:
    keys: torch.Tensor  # [layers, kv_heads, m, head_dim]
    values: torch.Tensor
    unpooled_tokens: int  # the task's prompt length before pooling (l)

    @property
    def tokens(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()


class PromptKVCache(PromptKVLRU):
    """PromptKV entries by the adapter entry's cache key (task id, version)."""
