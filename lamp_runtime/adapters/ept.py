"""EPT / DePT: a short joint prompt [m, d] plus a low-rank offset A [s, r]·B [r, d] added to the
embeddings of the first s input tokens (an input of L < s tokens gets the first L rows).

Training-time modules (prompt fusion, multi-space projection) are folded into the stored joint
prompt by `lamp train --method ept`, so serving only prepends and adds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import AdapterError
from ..prompts.math import average_pool
from .base import AdapterLimits, PromptAdapter, check_rank


@dataclass(frozen=True)
class EptAdapter(PromptAdapter):
    prompt: torch.Tensor = None
    a: torch.Tensor = None
    b: torch.Tensor = None

    kind = "ept"
    TENSORS = ("ept.prompt", "ept.A", "ept.B")

    @property
    def prompt_tokens(self) -> int:
        return self.prompt.shape[0]

    @property
    def offset_tokens(self) -> int:
        return self.a.shape[0]

    def build_prompt(self) -> torch.Tensor:
        return average_pool(self.prompt, self.meta.pool)

    def build_offset(self) -> torch.Tensor:
        return self.a @ self.b

    def hidden_size(self, limits: AdapterLimits) -> int:
        p, a, b = self.prompt, self.a, self.b
        if p.dim() != 2 or a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0] or p.shape[1] != b.shape[1]:
            raise AdapterError(
                f"EPT tensors must be prompt [m, d], A [s, r], B [r, d]; got prompt {list(p.shape)}, "
                f"A {list(a.shape)}, B {list(b.shape)}"
            )
        check_rank("EPT", a.shape[1], limits)
        if not 1 <= a.shape[0] <= limits.max_prompt_tokens:
            raise AdapterError(f"EPT offset length s={a.shape[0]} outside 1..{limits.max_prompt_tokens}")
        return b.shape[1]

    def products(self) -> dict[str, torch.Tensor]:
        return {"A·B": self.a.float() @ self.b.float()}
