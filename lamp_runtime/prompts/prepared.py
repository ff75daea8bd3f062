"""A task's prompt ready for the engine, and how a request's input sequence is built from it.

Shared by every engine (the HF engines and the vLLM engine), so that the same adapter and input
give the same embeddings whichever engine runs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class PromptSource(Protocol):
    """What an adapter kind offers to be prepared (every `PromptAdapter` does)."""

    def build_prompt(self) -> torch.Tensor: ...

    def build_offset(self) -> torch.Tensor | None: ...


@dataclass(frozen=True)
class PreparedPrompt:
    """What the engine needs of one adapter version, ready on the device in the backbone's dtype."""

    prompt: torch.Tensor  # [tokens, d], prepended to the input embeddings
    offset: torch.Tensor | None = None  # [s, d], added to the first s input-token embeddings (EPT)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.prompt, self.offset) if t is not None)

    def to(self, device: torch.device, dtype: torch.dtype) -> "PreparedPrompt":
        def move(t):
            return None if t is None else t.to(device=device, dtype=dtype).contiguous()

        return PreparedPrompt(move(self.prompt), move(self.offset))


def prepare(adapter: PromptSource) -> PreparedPrompt:
    """Everything the engine needs of `adapter`, on the host in float32 (the prompt cache moves it)."""
    return PreparedPrompt(adapter.build_prompt(), adapter.build_offset())


def assemble_embeddings(prepared: PreparedPrompt | None, inputs: torch.Tensor) -> torch.Tensor:
    """[soft prompt ; input embeddings], with an EPT offset added to the first input tokens.

    `inputs` is [n, d] (n may be 0); `prepared` None means no task: the inputs alone.
    """
    if prepared is None:
        return inputs
    return torch.cat([prepared.prompt, offset_inputs(prepared, inputs)])


def offset_inputs(prepared: PreparedPrompt, inputs: torch.Tensor) -> torch.Tensor:
    """The input embeddings [n, d] with the EPT offset (if any) added to the first min(n, s) rows."""
    offset = prepared.offset
    if offset is None or not inputs.shape[0]:
        return inputs
    n = min(inputs.shape[0], offset.shape[0])
    return torch.cat([inputs[:n] + offset[:n], inputs[n:]])
