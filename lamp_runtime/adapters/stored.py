"""An adapter version known by its facts, whose factors stay in storage until a request needs them.

A replica serving 100,000 tasks cannot keep every adapter's factors in memory (~22 KB for a LAMP
adapter with l=100, r=8 on d=576; 230 KB for a plain 100-token soft prompt: 2-23 GB in all). It
keeps one `StoredAdapterRef` per task instead (its kind, lengths and header metadata: what admission,
chat rendering and the result need) and loads the factors of the tasks being served into a
byte-bounded host cache (engine/resident.py). `load` re-reads the stored file and checks its hash
(and its shapes against this backbone): what runs is always the bytes the store validated and
recorded when they were written, so their values are not checked again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .base import AdapterMeta, PromptAdapter


@dataclass(frozen=True)
class StoredAdapterRef:
    kind: str
    prompt_tokens: int
    pooled_tokens: int
    meta: AdapterMeta
    host_bytes: int  # of the factors once loaded: what they take in the resident cache
    load: Callable[[], PromptAdapter] = field(repr=False, compare=False)

    @classmethod
    def of(cls, adapter: PromptAdapter, load: Callable[[], PromptAdapter]) -> "StoredAdapterRef":
        """A reference to the stored version `adapter` was read from (`load` reads it again)."""
        return cls(adapter.kind, adapter.prompt_tokens, adapter.pooled_tokens, adapter.meta, adapter.host_bytes,
                   load)
