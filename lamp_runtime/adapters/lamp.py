"""LAMP: factors U [l, r], Q [r], V [r, d]; prompt = avg_pool(U·diag(Q)·V, p)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import AdapterError
from ..prompts.math import average_pool, compressed_outer_product
from .base import AdapterLimits, PromptAdapter, check_rank


@dataclass(frozen=True)
class LampAdapter(PromptAdapter):
    u: torch.Tensor = None
    q: torch.Tensor = None
    v: torch.Tensor = None

    kind = "lamp"
    TENSORS = ("lamp.U", "lamp.Q", "lamp.V")

    @property
    def prompt_tokens(self) -> int:
        return self.u.shape[0]

    @property
    def rank(self) -> int:
        return self.q.shape[0]

    def build_prompt(self) -> torch.Tensor:
        return average_pool(compressed_outer_product(self.u, self.q, self.v), self.meta.pool)

    def hidden_size(self, limits: AdapterLimits) -> int:
        u, q, v = self.u, self.q, self.v
        if u.dim() != 2 or q.dim() != 1 or v.dim() != 2:
            raise AdapterError(
                f"LAMP factors must be U [l, r], Q [r], V [r, d]; got U {list(u.shape)}, "
                f"Q {list(q.shape)}, V {list(v.shape)}"
            )
        r = q.shape[0]
        if u.shape[1] != r or v.shape[0] != r:
            raise AdapterError(
                f"LAMP rank mismatch: U {list(u.shape)}, Q {list(q.shape)}, V {list(v.shape)} "
                f"must share r (U [l, r], Q [r], V [r, d])"
            )
        check_rank("LAMP", r, limits)
        return v.shape[1]

    def products(self) -> dict[str, torch.Tensor]:
        return {"U·diag(Q)·V": compressed_outer_product(self.u.float(), self.q.float(), self.v.float())}
