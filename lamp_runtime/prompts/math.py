"""Soft-prompt arithmetic shared by every adapter kind.

LAMP stores a prompt as factors U [l, r], Q [r], V [r, d]. The prompt is rebuilt by the
compressed outer product C = sum_i Q_i * outer(U[:, i], V[i, :]), which equals U @ diag(Q) @ V,
and then average-pooled along the token axis with block p.
"""

from __future__ import annotations

import math

import torch


def compressed_outer_product(u: torch.Tensor, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """C = sum_i q[i] * outer(u[:, i], v[i, :]) -> [l, d].

    Written as one einsum (the sum over i is the contraction), so it costs one GEMM rather
    than r rank-1 updates. `tests/runtime/test_prompt_math.py` checks it against the explicit sum.
    """
    return torch.einsum("li,i,id->ld", u, q, v)


def pooled_length(length: int, pool: int) -> int:
    """Number of tokens after average pooling `length` tokens with block `pool`: ceil(l / p)."""
    return math.ceil(length / pool)


def average_pool(prompt: torch.Tensor, pool: int) -> torch.Tensor:
    """Average consecutive blocks of `pool` tokens of a [l, d] prompt -> [ceil(l/p), d].

    When p does not divide l, the last block is shorter and averages only the tokens that are
    left (it is not zero-padded), so every output token is a true mean of real prompt tokens.
    p = 1 returns the prompt unchanged.
    """
    if pool < 1:
        raise ValueError(f"pool must be >= 1, got {pool}")
    if pool == 1:
        return prompt
    length, dim = prompt.shape
    full_blocks = length // pool
    parts = []
    if full_blocks:
        parts.append(prompt[: full_blocks * pool].reshape(full_blocks, pool, dim).mean(dim=1))
    if length % pool:
        parts.append(prompt[full_blocks * pool :].mean(dim=0, keepdim=True))
    return torch.cat(parts, dim=0)
