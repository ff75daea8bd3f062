"""A plain soft prompt [l, d] (prompt tuning), optionally average-pooled with block p.

PEFT prompt-tuning checkpoints load as this kind too (peft.py); `source_format` remembers that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import AdapterError
from ..prompts.math import average_pool
from .base import AdapterLimits, PromptAdapter


@dataclass(frozen=True)
class SoftPromptAdapter(PromptAdapter):
    prompt: torch.Tensor = None
    source_format: str = "soft_prompt"

    kind = "soft_prompt"
    TENSORS = ("prompt",)

    @property
    def prompt_tokens(self) -> int:
        return self.prompt.shape[0]

    def build_prompt(self) -> torch.Tensor:
        return average_pool(self.prompt, self.meta.pool)

    def hidden_size(self, limits: AdapterLimits) -> int:
        if self.prompt.dim() != 2:
            raise AdapterError(f"prompt must be [l, d], got shape {list(self.prompt.shape)}")
        return self.prompt.shape[1]
